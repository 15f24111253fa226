//! The conformance battery every caremsg gateway plugin must pass.
//!
//! [`run`] loads a plugin `.so` through the real host (`caremsg-plugin-host`), starts
//! it with a [`Suite`]'s configuration and checks, printing one line per check:
//!
//! - **handshake**: the library loads (symbol, magic, ABI, struct sizes, unwind flag);
//! - **wrong ABI major refused**: the entry point returns null for host major + 1;
//! - **bad config**: `start("not json")` is a clean error, not a panic or a success;
//! - **start** and **health** with the suite's configuration;
//! - **send mapping**: each send case (and its `expect_request`, checked against
//!   what the fake received), with the host's real HTTP service
//!   ([`caremsg_plugin_host::HyperHttp`]) allowed to reach a loopback fake server
//!   that answers with the case's scripted response;
//! - **logs hold no PHI**: no log line contains the sample's numbers or body;
//! - **webhooks**: each case's status and number of events, with `${NOW}` and
//!   signatures computed as the case runs (see [`suite`]);
//! - **concurrent sends**: 200 sends from 200 threads at once;
//! - **back-pressure**: the first webhook case that emits succeeds without
//!   back-pressure, then, with the host saying "busy", returns promptly with 429 or
//!   503 (so the provider retries);
//! - **adversarial inputs**: empty, huge, non-UTF-8 and odd inputs cause no panic,
//!   no hang and no malformed answer, and the instance still answers afterwards;
//! - **stop**, then **calls after stop refused** and **no service calls after stop**.
//!
//! Every plugin call runs under a deadline, so a hanging plugin fails a check instead
//! of hanging the battery. The last line is `N passed, M failed`.

pub mod fake;
pub mod harness;
mod recorder;
mod signer;
pub mod suite;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use caremsg_plugin_host::{
    CallError, DEFAULT_WEBHOOK_EVENT_LIMIT, HOST_ABI, Health, HyperHttp, Instance, Outbound,
    SendOutcome, StartError, WebhookRequest, load,
};

use crate::fake::Fake;
use crate::fake::Received;
use crate::recorder::Recorder;
pub use crate::signer::ed25519_public_key;
pub use crate::signer::request_of as webhook_request;
use crate::signer::request_of;
pub use crate::suite::Suite;
use crate::suite::{Expect, ExpectRequest, SendCase, WebhookCase};

/// The instance name the battery starts plugins under.
pub const INSTANCE: &str = "testkit";

/// How long any single plugin call (or batch of concurrent calls) may take.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// What was seen.
    pub detail: String,
}

/// Every check of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// In the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    /// How many passed.
    pub fn passed(&self) -> usize {
        self.checks.iter().filter(|c| c.passed).count()
    }

    /// How many failed.
    pub fn failed(&self) -> usize {
        self.checks.len() - self.passed()
    }

    /// `N passed, M failed`.
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed", self.passed(), self.failed())
    }

    /// The first check whose name starts with `prefix`.
    pub fn check(&self, prefix: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name.starts_with(prefix))
    }
}

/// Records checks and prints each as it completes.
struct Battery<'a> {
    report: Report,
    out: &'a mut dyn Write,
}

impl Battery<'_> {
    fn record(&mut self, name: impl Into<String>, result: Result<String, String>) -> bool {
        let name = name.into();
        let (passed, detail) = match result {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        let _ = writeln!(
            self.out,
            "{} {name}: {detail}",
            if passed { "ok  " } else { "FAIL" }
        );
        self.report.checks.push(Check {
            name,
            passed,
            detail,
        });
        passed
    }
}

/// Runs `call` on its own thread; `None` if it did not return within `deadline`
/// (the thread is abandoned).
fn within<T: Send + 'static>(
    deadline: Duration,
    call: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(call());
    });
    receiver.recv_timeout(deadline).ok()
}

fn late(what: &str) -> String {
    format!("{what} did not return within {DEADLINE:?}")
}

/// Runs the battery against the plugin at `plugin`, printing a line per check and
/// the summary to `out`. Errors only when the battery itself cannot be set up.
pub fn run(plugin: &Path, suite: &Suite, out: &mut dyn Write) -> Result<Report, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let fake =
        Fake::start(runtime.handle()).map_err(|e| format!("cannot start the fake server: {e}"))?;
    let tmp = tempfile::tempdir().map_err(|e| format!("cannot create a temporary folder: {e}"))?;
    let http = HyperHttp::new(runtime.handle().clone(), Duration::from_secs(10));
    http.set_allowed_hosts(INSTANCE, [fake.addr.to_string()]);
    let recorder = Arc::new(Recorder::new(http));
    let mut battery = Battery {
        report: Report::default(),
        out,
    };
    let config = suite.config_json(&tmp.path().display().to_string(), &fake.url());
    checks(&mut battery, plugin, suite, &config, &fake, &recorder);
    let summary = battery.report.summary();
    let _ = writeln!(battery.out, "{summary}");
    Ok(battery.report)
}

fn checks(
    battery: &mut Battery<'_>,
    path: &Path,
    suite: &Suite,
    config: &str,
    fake: &Fake,
    recorder: &Arc<Recorder>,
) {
    // Handshake.
    let plugin = match load(path) {
        Ok(plugin) => {
            let m = plugin.metadata();
            battery.record(
                "handshake",
                Ok(format!(
                    "{} {} ({}), ABI {}.{}, SDK {}",
                    plugin.name(),
                    m.version.as_deref().unwrap_or("?"),
                    plugin.kind(),
                    m.abi_major,
                    m.abi_minor,
                    m.sdk_version.as_deref().unwrap_or("?")
                )),
            );
            plugin
        }
        Err(error) => {
            battery.record("handshake", Err(error.to_string()));
            return;
        }
    };
    let wrong = HOST_ABI.0 + 1;
    battery.record(
        "wrong ABI major refused",
        if plugin.entry_accepts(wrong, 0) {
            Err(format!("the entry point accepted host ABI {wrong}.0"))
        } else {
            Ok(format!(
                "the entry point returned null for host ABI {wrong}.0"
            ))
        },
    );

    // Bad configuration.
    let (p, services) = (plugin.clone(), recorder.clone());
    let result = within(DEADLINE, move || p.start(INSTANCE, "not json", services));
    battery.record(
        "bad config is a clean start error",
        match result {
            None => Err(late("start")),
            Some(Err(StartError::Refused(message))) if !message.trim().is_empty() => {
                Ok(format!("refused: {message}"))
            }
            Some(Err(StartError::Refused(_))) => Err("refused without a message".to_owned()),
            Some(Err(StartError::Call(error))) => Err(error.to_string()),
            Some(Ok(instance)) => {
                let _ = instance.stop();
                Err("started with the configuration \"not json\"".to_owned())
            }
        },
    );

    // Start.
    let (p, services, config) = (plugin.clone(), recorder.clone(), config.to_owned());
    let instance = match within(DEADLINE, move || p.start(INSTANCE, &config, services)) {
        Some(Ok(instance)) => {
            battery.record(
                "start",
                Ok("started with the suite's configuration".to_owned()),
            );
            Arc::new(instance)
        }
        Some(Err(error)) => {
            battery.record("start", Err(error.to_string()));
            return;
        }
        None => {
            battery.record("start", Err(late("start")));
            return;
        }
    };

    let i = instance.clone();
    battery.record(
        "health",
        match within(DEADLINE, move || i.health()) {
            None => Err(late("health")),
            Some(Ok(Health::Ok)) => Ok("ok".to_owned()),
            Some(Ok(Health::Degraded(why))) => Ok(format!("degraded: {why}")),
            Some(Ok(Health::Down(why))) => Err(format!("down: {why}")),
            Some(Err(error)) => Err(error.to_string()),
        },
    );

    let cases = suite.send_cases();
    for (n, case) in cases.iter().enumerate() {
        send_case(battery, &instance, suite, fake, case, n);
    }
    logs_hold_no_phi(battery, suite, recorder);
    for case in &suite.webhooks {
        webhook_case(battery, &instance, case);
    }
    concurrent_sends(battery, &instance, suite, fake, &cases[0]);
    back_pressure(battery, &instance, suite, recorder);
    adversarial(battery, &instance, suite);

    // Stop.
    let i = instance.clone();
    battery.record(
        "stop",
        match within(DEADLINE, move || i.stop()) {
            None => Err(late("stop")),
            Some(Ok(())) => Ok("stopped".to_owned()),
            Some(Err(error)) => Err(error.to_string()),
        },
    );
    recorder.stopped.store(true, Ordering::SeqCst);
    battery.record(
        "calls after stop refused",
        match instance.send(&outbound(suite, 999_999)) {
            Err(CallError::Stopped) => Ok("send after stop was refused by the host".to_owned()),
            other => Err(format!("send after stop returned {other:?}")),
        },
    );
    let late_calls = instance.calls_after_stop() + recorder.after_stop.load(Ordering::SeqCst);
    battery.record(
        "no emit after stop",
        if late_calls == 0 {
            Ok("no emit, log or http call after stop returned".to_owned())
        } else {
            Err(format!(
                "{late_calls} service call(s) after stop returned: a plugin thread outlived stop"
            ))
        },
    );
}

fn outbound(suite: &Suite, n: usize) -> Outbound {
    Outbound {
        delivery_id: format!("testkit-{n}"),
        to: suite.outbound.to.clone(),
        from: suite.outbound.from.clone(),
        body: suite.outbound.body.clone(),
        idempotency_key: format!("testkit-key-{n}"),
        subject: suite.outbound.subject.clone(),
        attempt: 1,
    }
}

fn describe(outcome: &SendOutcome) -> String {
    match outcome {
        SendOutcome::Sent { provider_id } => format!("sent (provider id {provider_id:?})"),
        SendOutcome::Retryable {
            after,
            code,
            reason,
        } => {
            format!("retryable (after {after:?}, code {code:?}): {reason}")
        }
        SendOutcome::Permanent { code, reason } => format!("permanent (code {code:?}): {reason}"),
        SendOutcome::Unsubscribed { reason } => format!("unsubscribed: {reason}"),
    }
}

fn matches(case: &SendCase, outcome: &SendOutcome) -> Result<(), String> {
    let (kind, code) = match outcome {
        SendOutcome::Sent { provider_id } if provider_id.trim().is_empty() => {
            return Err("sent, but with an empty provider id".to_owned());
        }
        SendOutcome::Sent { .. } => (Expect::Sent, None),
        SendOutcome::Retryable { code, .. } => (Expect::Retryable, code.as_deref()),
        SendOutcome::Permanent { code, .. } => (Expect::Permanent, Some(code.as_str())),
        SendOutcome::Unsubscribed { .. } => (Expect::Unsubscribed, None),
    };
    if kind != case.expect {
        return Err(format!(
            "expected {:?}, got {}",
            case.expect,
            describe(outcome)
        ));
    }
    if let Some(expected) = &case.code
        && code != Some(expected.as_str())
    {
        return Err(format!(
            "expected code {expected:?}, got {}",
            describe(outcome)
        ));
    }
    Ok(())
}

fn send_case(
    battery: &mut Battery<'_>,
    instance: &Arc<Instance>,
    suite: &Suite,
    fake: &Fake,
    case: &SendCase,
    n: usize,
) {
    if let Some(response) = &case.fake {
        fake.set(response.clone());
    }
    let before = fake.requests();
    fake.clear_received();
    let (i, message) = (instance.clone(), outbound(suite, n));
    let result = match within(DEADLINE, move || i.send(&message)) {
        None => Err(late("send")),
        Some(Err(error)) => Err(error.to_string()),
        Some(Ok(outcome)) => matches(case, &outcome)
            .and_then(|()| match &case.expect_request {
                None => Ok(""),
                Some(expected) => fake
                    .received()
                    .last()
                    .ok_or_else(|| "the plugin sent no request to the fake".to_owned())
                    .and_then(|got| request_matches(expected, got))
                    .map(|()| ", request as expected"),
            })
            .map(|checked| {
                let calls = fake.requests() - before;
                let via = if case.fake.is_some() {
                    format!(" ({calls} request(s) to the fake{checked})")
                } else {
                    String::new()
                };
                format!("{}{via}", describe(&outcome))
            }),
    };
    battery.record(format!("send maps {}", case.name), result);
}

/// Whether the request the fake `got` is what `expected` describes; the first
/// difference otherwise.
fn request_matches(expected: &ExpectRequest, got: &Received) -> Result<(), String> {
    let path = got
        .path_and_query
        .split_once('?')
        .map_or(got.path_and_query.as_str(), |(path, _)| path);
    if let Some(method) = &expected.method
        && !method.eq_ignore_ascii_case(&got.method)
    {
        return Err(format!("expected a {method} request, got {}", got.method));
    }
    if let Some(want) = &expected.path
        && want != path
    {
        return Err(format!("expected path {want:?}, got {path:?}"));
    }
    for (name, want) in &expected.headers {
        match got.header(name) {
            Some(value) if value == want => {}
            Some(_) => return Err(format!("header {name:?} differs from the expected value")),
            None => return Err(format!("header {name:?} is missing")),
        }
    }
    if !expected.json.is_empty() {
        let body: serde_json::Value = serde_json::from_slice(&got.body)
            .map_err(|_| "the request body is not JSON".to_owned())?;
        for (pointer, want) in &expected.json {
            match body.pointer(pointer) {
                Some(value) if value == want => {}
                Some(value) => {
                    return Err(format!("JSON {pointer} is {value}, expected {want}"));
                }
                None => return Err(format!("JSON {pointer} is missing")),
            }
        }
    }
    if !expected.form.is_empty() {
        let fields: Vec<(String, String)> = form_urlencoded::parse(&got.body)
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect();
        for (name, want) in &expected.form {
            match fields.iter().find(|(n, _)| n == name) {
                Some((_, value)) if value == want => {}
                Some((_, value)) => {
                    return Err(format!(
                        "form field {name:?} is {value:?}, expected {want:?}"
                    ));
                }
                None => return Err(format!("form field {name:?} is missing")),
            }
        }
    }
    Ok(())
}

fn logs_hold_no_phi(battery: &mut Battery<'_>, suite: &Suite, recorder: &Recorder) {
    let sample = &suite.outbound;
    let mut secrets = vec![sample.to.as_str(), sample.from.as_str()];
    if sample.body.chars().count() >= 8 {
        secrets.push(sample.body.as_str());
    }
    let logs = recorder.logs();
    let leaks = logs
        .iter()
        .filter(|(_, line)| secrets.iter().any(|s| !s.is_empty() && line.contains(s)))
        .count();
    battery.record(
        "logs hold no PHI",
        if leaks == 0 {
            Ok(format!(
                "{} log line(s), none with the sample's numbers or body",
                logs.len()
            ))
        } else {
            Err(format!(
                "{leaks} log line(s) contain the sample's numbers or body"
            ))
        },
    );
}

fn webhook_case(battery: &mut Battery<'_>, instance: &Arc<Instance>, case: &WebhookCase) {
    let request = match request_of(case) {
        Ok(request) => request,
        Err(error) => {
            battery.record(format!("webhook {}", case.name), Err(error));
            return;
        }
    };
    let i = instance.clone();
    let result = match within(DEADLINE, move || i.handle_webhook(&request)) {
        None => Err(late("handle_webhook")),
        Some(Err(error)) => Err(error.to_string()),
        Some(Ok(outcome)) => {
            let got = (outcome.response.status, outcome.events.len());
            if got == (case.expect_status, case.expect_events) {
                Ok(format!("{} with {} event(s)", got.0, got.1))
            } else {
                Err(format!(
                    "expected {} with {} event(s), got {} with {} event(s)",
                    case.expect_status, case.expect_events, got.0, got.1
                ))
            }
        }
    };
    battery.record(format!("webhook {}", case.name), result);
}

fn concurrent_sends(
    battery: &mut Battery<'_>,
    instance: &Arc<Instance>,
    suite: &Suite,
    fake: &Fake,
    case: &SendCase,
) {
    if let Some(response) = &case.fake {
        fake.set(response.clone());
    }
    let count = suite.concurrent_sends.max(1);
    let messages: Vec<Outbound> = (0..count).map(|n| outbound(suite, 1000 + n)).collect();
    let i = instance.clone();
    let outcomes = within(DEADLINE, move || {
        let barrier = Arc::new(Barrier::new(count));
        let threads: Vec<_> = messages
            .into_iter()
            .map(|message| {
                let (i, barrier) = (i.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    i.send(&message)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().map_err(|_| "a sending thread panicked".to_owned()))
            .collect::<Vec<_>>()
    });
    let result = match outcomes {
        None => Err(late(&format!("{count} concurrent sends"))),
        Some(outcomes) => {
            let mut ids = HashSet::new();
            let mut problems = Vec::new();
            for outcome in &outcomes {
                match outcome {
                    Err(e) => problems.push(e.clone()),
                    Ok(Err(e)) => problems.push(e.to_string()),
                    Ok(Ok(outcome)) => {
                        if let Err(e) = matches(case, outcome) {
                            problems.push(e);
                        }
                        if let SendOutcome::Sent { provider_id } = outcome {
                            ids.insert(provider_id.clone());
                        }
                    }
                }
            }
            if let Some(first) = problems.first() {
                Err(format!(
                    "{} of {count} sends went wrong; first: {first}",
                    problems.len()
                ))
            } else if case.expect == Expect::Sent && ids.len() != count {
                Err(format!(
                    "{count} sends returned only {} distinct provider ids",
                    ids.len()
                ))
            } else {
                Ok(format!(
                    "{count} sends from {count} threads, all {:?}",
                    case.expect
                ))
            }
        }
    };
    battery.record(format!("{count} concurrent sends"), result);
}

fn back_pressure(
    battery: &mut Battery<'_>,
    instance: &Arc<Instance>,
    suite: &Suite,
    recorder: &Recorder,
) {
    let case = suite.webhooks.iter().find(|c| c.expect_events > 0);
    // First without back-pressure: the case must succeed, so that the refusal below
    // is back-pressure and not (say) a stale signature.
    let baseline = case.map(|case| {
        let request = request_of(case)?;
        let i = instance.clone();
        match within(DEADLINE, move || i.handle_webhook(&request)) {
            None => Err(late("handle_webhook")),
            Some(Err(error)) => Err(error.to_string()),
            Some(Ok(outcome))
                if (200..300).contains(&outcome.response.status) && !outcome.events.is_empty() =>
            {
                Ok(outcome.response.status)
            }
            Some(Ok(outcome)) => Err(format!(
                "webhook {:?} answered {} with {} event(s) without back-pressure; it must succeed before back-pressure can be checked",
                case.name,
                outcome.response.status,
                outcome.events.len()
            )),
        }
    });
    if let Some(Err(error)) = &baseline {
        battery.record("emit back-pressure", Err(error.clone()));
        return;
    }
    recorder.busy.store(true, Ordering::SeqCst);
    instance.set_webhook_event_limit(0);
    let (i, message) = (instance.clone(), outbound(suite, 5000));
    let send_returned = within(DEADLINE, move || i.send(&message)).is_some();
    let result = match (send_returned, case) {
        (false, _) => Err(late("send while the host was busy")),
        (true, None) => {
            Ok("send returned while the host was busy (no webhook case emits events)".to_owned())
        }
        (true, Some(case)) => match request_of(case) {
            Err(error) => Err(error),
            Ok(request) => {
                let i = instance.clone();
                match within(DEADLINE, move || i.handle_webhook(&request)) {
                    None => Err(late("handle_webhook while the host was busy")),
                    Some(Err(error)) => Err(error.to_string()),
                    Some(Ok(outcome)) if matches!(outcome.response.status, 429 | 503) => {
                        Ok(format!(
                            "webhook {:?} answered {} without back-pressure, then {} promptly while the host was busy",
                            case.name,
                            baseline.and_then(Result::ok).unwrap_or_default(),
                            outcome.response.status
                        ))
                    }
                    Some(Ok(outcome)) => Err(format!(
                        "webhook {:?} answered {} while its events were refused; expected 429 or 503 so the provider retries",
                        case.name, outcome.response.status
                    )),
                }
            }
        },
    };
    recorder.busy.store(false, Ordering::SeqCst);
    instance.set_webhook_event_limit(DEFAULT_WEBHOOK_EVENT_LIMIT);
    battery.record("emit back-pressure", result);
}

fn adversarial(battery: &mut Battery<'_>, instance: &Arc<Instance>, suite: &Suite) {
    let base = outbound(suite, 7000);
    let long: String = "Ünïcödé ✓ 😀 ".repeat(200);
    let sends = [
        Outbound {
            body: String::new(),
            ..base.clone()
        },
        Outbound {
            to: String::new(),
            ..base.clone()
        },
        Outbound {
            from: String::new(),
            ..base.clone()
        },
        Outbound {
            to: "not a number".to_owned(),
            ..base.clone()
        },
        Outbound {
            body: long,
            ..base.clone()
        },
        Outbound {
            body: "nul \0 and bidi \u{202e} controls".to_owned(),
            ..base.clone()
        },
        Outbound {
            attempt: u32::MAX,
            subject: Some(String::new()),
            ..base.clone()
        },
    ];
    let template = suite
        .webhooks
        .first()
        .and_then(|case| request_of(case).ok())
        .unwrap_or(WebhookRequest {
            method: "POST".to_owned(),
            public_url: "http://127.0.0.1:8080/v1/hooks/testkit".to_owned(),
            remote_addr: "127.0.0.1:40000".parse().ok(),
            headers: Vec::new(),
            body: Vec::new(),
        });
    let hooks = [
        WebhookRequest {
            body: vec![0xff, 0xfe, 0x00, 0x80],
            ..template.clone()
        },
        WebhookRequest {
            body: Vec::new(),
            ..template.clone()
        },
        WebhookRequest {
            method: "DELETE".to_owned(),
            ..template.clone()
        },
        WebhookRequest {
            remote_addr: None,
            ..template.clone()
        },
        WebhookRequest {
            body: vec![b'{'; 1 << 20],
            ..template.clone()
        },
        WebhookRequest {
            headers: vec![
                ("x-odd".to_owned(), vec![0xff; 64]),
                ("content-type".to_owned(), b"???".to_vec()),
            ],
            ..template.clone()
        },
        WebhookRequest {
            public_url: String::new(),
            ..template
        },
    ];
    let total = sends.len() + hooks.len();
    let i = instance.clone();
    let outcome = within(DEADLINE, move || {
        let mut errors: Vec<CallError> = Vec::new();
        for message in &sends {
            if let Err(error) = i.send(message) {
                errors.push(error);
            }
        }
        for request in &hooks {
            if let Err(error) = i.handle_webhook(request) {
                errors.push(error);
            }
        }
        let alive = i.health().is_ok();
        (errors, alive)
    });
    let (result, alive) = match outcome {
        None => (Err(late("the adversarial calls")), None),
        Some((errors, alive)) => {
            let bad: Vec<String> = errors
                .iter()
                .filter(|e| !matches!(e, CallError::InvalidInput { .. }))
                .map(ToString::to_string)
                .collect();
            let result = match bad.first() {
                None => Ok(format!(
                    "{total} odd sends and webhooks: no panic, no hang, no malformed answer"
                )),
                Some(first) => Err(format!(
                    "{} of {total} calls failed; first: {first}",
                    bad.len()
                )),
            };
            (result, Some(alive))
        }
    };
    battery.record("adversarial inputs", result);
    battery.record(
        "panic containment",
        match alive {
            Some(true) => Ok(
                "the process and the instance still answer after the adversarial calls".to_owned(),
            ),
            Some(false) => Err("the instance no longer answers health".to_owned()),
            None => Err("the adversarial calls hung".to_owned()),
        },
    );
}
