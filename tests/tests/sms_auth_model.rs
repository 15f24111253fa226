//! A state-machine property test of SMS authentication: random sequences of staff
//! actions, patient replies, clock advances and daemon restarts, run against the real
//! daemon (texts through the real loopback webhook) and a simple model of SPEC.md.
//!
//! Three patients: `pat0` and `pat1` share one mobile number, `pat2` has its own.
//! Steps include concurrent operations (two staff starting SMS for the two patients
//! of one number at once; two STOPs from one number at once) and bursts of texts
//! from one number while the automatic-answer limit is tight. After every step: each
//! patient's status is the model's; never more than three wrong attempts; at most one
//! patient of a number is pending or enabled; every text of a burst is stored; and no
//! text is ever queued for an opted-out number except its single opt-out
//! confirmation.
//!
//! Each case starts a daemon, so the case count is small by default;
//! `CAREMSG_PROPTEST_CASES` raises it. Failing cases are kept in
//! `sms_auth_model.proptest-regressions` (committed) and replayed first.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::sync::atomic::{AtomicU32, Ordering};

use caremsg_entities::{
    DeliveryChannel, Direction, SmsStatus, delivery, inbound_receipt, message, patient,
    practice_sms_number, unmatched_inbound,
};
use caremsg_tests::{STAFF_TOKEN, TestDaemon, patient_body};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use reqwest::{Method, StatusCode};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};

/// The mobile numbers: `pat0` and `pat1` on the first, `pat2` on the second.
const PHONES: [&str; 2] = ["+12015550123", "+12015550124"];
const PATIENTS: usize = 3;

fn phone_of(patient: usize) -> usize {
    usize::from(patient == 2)
}

#[derive(Debug, Clone)]
enum Step {
    Start(usize),
    Resend(usize),
    StaffOptOut(usize),
    Correct(usize),
    Wrong(usize),
    Stop(usize),
    Help(usize),
    OptIn(usize),
    /// Staff start SMS for `pat0` and `pat1` (one number) at the same moment.
    StartBoth,
    /// Two STOPs from one number at the same moment.
    TwoStops(usize),
    /// Texts from one number in a quick burst (over the automatic-answer limit).
    Burst(usize, u8),
    Advance(u32),
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    let p = 0..PATIENTS;
    let n = 0..PHONES.len();
    prop_oneof![
        3 => p.clone().prop_map(Step::Start),
        1 => p.clone().prop_map(Step::Resend),
        1 => p.clone().prop_map(Step::StaffOptOut),
        2 => n.clone().prop_map(Step::Correct),
        3 => n.clone().prop_map(Step::Wrong),
        1 => n.clone().prop_map(Step::Stop),
        1 => n.clone().prop_map(Step::Help),
        1 => n.clone().prop_map(Step::OptIn),
        1 => Just(Step::StartBoth),
        1 => n.clone().prop_map(Step::TwoStops),
        1 => (n, 2u8..6).prop_map(|(n, k)| Step::Burst(n, k)),
        2 => (1u32..16).prop_map(Step::Advance),
        1 => Just(Step::Restart),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    None,
    Pending,
    Enabled,
    Failed,
    OptedOutByPatient,
    OptedOutByStaff,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Pending => "pending",
            Self::Enabled => "enabled",
            Self::Failed => "failed",
            Self::OptedOutByPatient | Self::OptedOutByStaff => "opted_out",
        }
    }

    fn opted_out(self) -> bool {
        matches!(self, Self::OptedOutByPatient | Self::OptedOutByStaff)
    }

    fn active(self) -> bool {
        matches!(self, Self::Pending | Self::Enabled)
    }
}

#[derive(Debug, Clone, Copy)]
struct PatientModel {
    status: Status,
    attempts: u32,
    /// Days since the start of the case when the pending window ends.
    window_end: u32,
    /// The step of its last status change (the daemon's `updated_at`: each step runs
    /// at an instant of its own).
    changed: usize,
}

/// SPEC.md's rules, for three patients on two numbers.
#[derive(Debug, Clone)]
struct Model {
    patients: [PatientModel; PATIENTS],
    number_opted_out: [bool; 2],
    confirmations: [u32; 2],
    now: u32,
    step: usize,
}

/// Where a text from a number goes.
enum Route {
    Patient(usize),
    Unmatched,
}

impl Model {
    fn new() -> Self {
        let patient = PatientModel {
            status: Status::None,
            attempts: 0,
            window_end: 0,
            changed: 0,
        };
        Self {
            patients: [patient; PATIENTS],
            number_opted_out: [false; 2],
            confirmations: [0; 2],
            now: 0,
            step: 0,
        }
    }

    fn on(&self, number: usize) -> impl Iterator<Item = usize> + '_ {
        (0..PATIENTS).filter(move |&p| phone_of(p) == number)
    }

    /// The patient pending or enabled on `number`; else, for a keyword, the one who
    /// opted out most recently.
    fn route(&self, number: usize, keyword: bool) -> Route {
        if let Some(p) = self.on(number).find(|&p| self.patients[p].status.active()) {
            return Route::Patient(p);
        }
        if keyword
            && let Some(p) = self
                .on(number)
                .filter(|&p| self.patients[p].status.opted_out())
                .max_by_key(|&p| self.patients[p].changed)
        {
            return Route::Patient(p);
        }
        Route::Unmatched
    }

    fn set(&mut self, patient: usize, status: Status) {
        self.patients[patient].status = status;
        self.patients[patient].changed = self.step;
    }

    fn open_session(&mut self, patient: usize) {
        self.set(patient, Status::Pending);
        self.patients[patient].attempts = 0;
        self.patients[patient].window_end = self.now + 14;
    }

    fn wrong_attempt(&mut self, patient: usize) {
        self.patients[patient].attempts += 1;
        if self.patients[patient].attempts == 3 {
            self.set(patient, Status::Failed);
        }
    }

    fn start(&mut self, patient: usize) -> u16 {
        let number = phone_of(patient);
        let status = self.patients[patient].status;
        if status == Status::OptedOutByPatient
            || status == Status::Pending
            || self.number_opted_out[number]
        {
            return 409;
        }
        if self
            .on(number)
            .any(|other| other != patient && self.patients[other].status.active())
        {
            return 409;
        }
        self.open_session(patient);
        200
    }

    fn stop(&mut self, number: usize) {
        if let Route::Patient(p) = self.route(number, true) {
            let repeated = self.number_opted_out[number] && self.patients[p].status.opted_out();
            if !repeated {
                self.set(p, Status::OptedOutByPatient);
            }
        }
        if !self.number_opted_out[number] {
            self.number_opted_out[number] = true;
            self.confirmations[number] += 1;
        }
    }

    /// Applies `step`; returns the HTTP statuses staff should get for staff actions.
    fn apply(&mut self, step: &Step) -> Vec<u16> {
        self.step += 1;
        match *step {
            Step::Start(p) => vec![self.start(p)],
            Step::Resend(p) => {
                if self.patients[p].status != Status::Pending || self.number_opted_out[phone_of(p)]
                {
                    return vec![409];
                }
                self.patients[p].window_end = self.now + 14;
                vec![200]
            }
            Step::StaffOptOut(p) => {
                if self.patients[p].status.opted_out() {
                    return vec![409];
                }
                self.set(p, Status::OptedOutByStaff);
                vec![200]
            }
            Step::Correct(n) => {
                if let Route::Patient(p) = self.route(n, false)
                    && self.patients[p].status == Status::Pending
                {
                    self.set(p, Status::Enabled);
                }
                vec![]
            }
            Step::Wrong(n) => {
                if let Route::Patient(p) = self.route(n, false)
                    && self.patients[p].status == Status::Pending
                {
                    self.wrong_attempt(p);
                }
                vec![]
            }
            Step::Stop(n) => {
                self.stop(n);
                vec![]
            }
            Step::TwoStops(n) => {
                self.stop(n);
                self.stop(n);
                vec![]
            }
            Step::Help(_) | Step::Restart => vec![],
            Step::Burst(n, k) => {
                // To a pending patient each text is a wrong date-of-birth reply.
                for _ in 0..k {
                    if let Route::Patient(p) = self.route(n, false)
                        && self.patients[p].status == Status::Pending
                    {
                        self.wrong_attempt(p);
                    }
                }
                vec![]
            }
            Step::OptIn(n) => {
                let was_opted_out = self.number_opted_out[n];
                match self.route(n, true) {
                    Route::Patient(p) if was_opted_out || self.patients[p].status.opted_out() => {
                        self.open_session(p);
                        self.number_opted_out[n] = false;
                    }
                    // START while pending is a wrong attempt.
                    Route::Patient(p) if self.patients[p].status == Status::Pending => {
                        self.wrong_attempt(p);
                    }
                    _ if was_opted_out => self.number_opted_out[n] = false,
                    _ => {}
                }
                vec![]
            }
            Step::StartBoth => unreachable!("applied by `start_both`"),
            Step::Advance(days) => {
                self.now += days;
                for p in 0..PATIENTS {
                    if self.patients[p].status == Status::Pending
                        && self.now >= self.patients[p].window_end
                    {
                        self.set(p, Status::Failed);
                    }
                }
                vec![]
            }
        }
    }

    /// Two starts at once: the outcome of one order or the other, whichever the
    /// daemon's statuses show.
    fn start_both(&mut self, got: [u16; 2]) -> Option<[u16; 2]> {
        self.step += 1;
        for first in [0, 1] {
            let mut m = self.clone();
            let a = m.start(first);
            let b = m.start(1 - first);
            let expected = if first == 0 { [a, b] } else { [b, a] };
            if expected == got {
                *self = m;
                return Some(expected);
            }
        }
        None
    }
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

async fn practice_number(d: &TestDaemon) -> String {
    practice_sms_number::Entity::find()
        .filter(practice_sms_number::Column::PracticeId.eq("p1"))
        .one(&d.daemon().state().db)
        .await
        .unwrap()
        .unwrap()
        .number
}

/// A text from `number` through the loopback webhook.
async fn text(d: &TestDaemon, to: &str, number: usize, body: &str) {
    let id = format!("m-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let response = d
        .http
        .post(format!("{}/v1/hooks/loopback", d.base))
        .json(&json!({"from": PHONES[number], "to": to, "body": body, "id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

async fn staff(d: &TestDaemon, patient: usize, action: &str) -> u16 {
    let (status, _) = d
        .call_as(
            Method::POST,
            &format!("/v1/staff/patients/pat{patient}/sms/{action}"),
            Some(STAFF_TOKEN),
            Some("u1"),
            None,
        )
        .await;
    status.as_u16()
}

async fn view(d: &TestDaemon, patient: usize) -> Value {
    d.call_as(
        Method::GET,
        &format!("/v1/staff/patients/pat{patient}/sms"),
        Some(STAFF_TOKEN),
        Some("u1"),
        None,
    )
    .await
    .1
}

async fn sms_rows(d: &TestDaemon, number: usize) -> Vec<delivery::Model> {
    delivery::Entity::find()
        .filter(delivery::Column::Recipient.eq(PHONES[number]))
        .filter(delivery::Column::Channel.eq(DeliveryChannel::Sms))
        .all(&d.daemon().state().db)
        .await
        .unwrap()
}

/// Texts from `number` stored anywhere: patient messages of its patients, and the
/// unmatched-inbound log.
async fn stored_from(d: &TestDaemon, number: usize) -> u64 {
    let db = &d.daemon().state().db;
    let ids: Vec<String> = (0..PATIENTS)
        .filter(|&p| phone_of(p) == number)
        .map(|p| format!("pat{p}"))
        .collect();
    let messages = message::Entity::find()
        .filter(message::Column::PatientId.is_in(ids))
        .filter(message::Column::Direction.eq(Direction::FromPatient))
        .count(db)
        .await
        .unwrap();
    let unmatched = unmatched_inbound::Entity::find()
        .filter(unmatched_inbound::Column::FromPhone.eq(PHONES[number]))
        .count(db)
        .await
        .unwrap();
    messages + unmatched
}

/// Inbound texts taken in (each once, whatever became of it).
async fn receipts(d: &TestDaemon) -> u64 {
    inbound_receipt::Entity::find()
        .count(&d.daemon().state().db)
        .await
        .unwrap()
}

async fn run_case(steps: Vec<Step>) {
    // A tight automatic-answer limit: bursts and repeated HELPs exceed it.
    let limit = "auto_answers_per_sender = { per_second = 0.001, burst = 2 }\n";
    let mut d = TestDaemon::start_with(|text| text + limit).await.unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    for p in 0..PATIENTS {
        let mut body = patient_body("p1", &[], &["u1"]);
        body["mobile_phone"] = json!(PHONES[phone_of(p)]);
        let (status, out) = d
            .admin_put(&format!("/v1/admin/patients/pat{p}"), body)
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
    }
    let to = practice_number(&d).await;
    let mut model = Model::new();
    for (i, step) in steps.iter().enumerate() {
        // Every step at an instant of its own (the model orders opt-outs by it).
        d.clock.advance(chrono::Duration::seconds(1));
        let before: Vec<usize> = vec![sms_rows(&d, 0).await.len(), sms_rows(&d, 1).await.len()];
        let context = format!("step {i} {step:?} of {steps:?}, model {model:?}");
        let (expected, got) = match *step {
            Step::StartBoth => {
                let (a, b) = tokio::join!(staff(&d, 0, "start"), staff(&d, 1, "start"));
                let got = [a, b];
                let expected = model.start_both(got);
                assert!(expected.is_some(), "{context}: got {got:?}");
                (vec![], vec![])
            }
            Step::Burst(n, k) => {
                let stored = stored_from(&d, n).await;
                let taken = receipts(&d).await;
                let to_pending = matches!(model.route(n, false), Route::Patient(p)
                    if model.patients[p].status == Status::Pending);
                let expected = model.apply(step);
                let texts = (0..k).map(|j| {
                    let to = &to;
                    let d = &d;
                    async move { text(d, to, n, &format!("part {j} of my question")).await }
                });
                futures::future::join_all(texts).await;
                assert_eq!(
                    receipts(&d).await,
                    taken + u64::from(k),
                    "{context}: every text of the burst is taken in"
                );
                if !to_pending {
                    // (Date-of-birth replies are recorded as attempts, not stored.)
                    assert_eq!(
                        stored_from(&d, n).await,
                        stored + u64::from(k),
                        "{context}: every text of the burst is stored"
                    );
                }
                (expected, vec![])
            }
            _ => {
                let expected = model.apply(step);
                let got = match *step {
                    Step::Start(p) => vec![staff(&d, p, "start").await],
                    Step::Resend(p) => vec![staff(&d, p, "resend").await],
                    Step::StaffOptOut(p) => vec![staff(&d, p, "opt-out").await],
                    Step::Correct(n) => {
                        text(&d, &to, n, "04/07/1950").await;
                        vec![]
                    }
                    Step::Wrong(n) => {
                        text(&d, &to, n, "01/01/1901").await;
                        vec![]
                    }
                    Step::Stop(n) => {
                        text(&d, &to, n, "STOP").await;
                        vec![]
                    }
                    Step::TwoStops(n) => {
                        tokio::join!(text(&d, &to, n, "STOP"), text(&d, &to, n, "stop"));
                        vec![]
                    }
                    Step::Help(n) => {
                        text(&d, &to, n, "HELP").await;
                        vec![]
                    }
                    Step::OptIn(n) => {
                        text(&d, &to, n, "START").await;
                        vec![]
                    }
                    Step::Advance(days) => {
                        d.clock.advance(chrono::Duration::days(i64::from(days)));
                        d.daemon().tick_timers().await.unwrap();
                        vec![]
                    }
                    Step::Restart => {
                        d.restart().await.unwrap();
                        vec![]
                    }
                    Step::StartBoth | Step::Burst(..) => unreachable!(),
                };
                (expected, got)
            }
        };
        assert_eq!(got, expected, "{context}");
        for p in 0..PATIENTS {
            let v = view(&d, p).await;
            let m = model.patients[p];
            assert_eq!(
                v["status"].as_str(),
                Some(m.status.name()),
                "{context}: pat{p} {v}"
            );
            assert!(v["attempts"].as_i64().unwrap() <= 3, "{context}: {v}");
            if m.status == Status::Pending {
                assert_eq!(
                    v["attempts"].as_i64(),
                    Some(i64::from(m.attempts)),
                    "{context}: pat{p} {v}"
                );
            }
        }
        for (n, before) in before.into_iter().enumerate() {
            let active = patient::Entity::find()
                .filter(patient::Column::MobilePhone.eq(PHONES[n]))
                .filter(patient::Column::SmsStatus.is_in([SmsStatus::Pending, SmsStatus::Enabled]))
                .count(&d.daemon().state().db)
                .await
                .unwrap();
            assert!(
                active <= 1,
                "{context}: {active} patients active on one number"
            );
            // While the number is opted out, nothing new is queued for it but its one
            // confirmation.
            if model.number_opted_out[n] {
                for row in &sms_rows(&d, n).await[before..] {
                    assert_eq!(
                        row.subject.as_deref(),
                        Some("opt_out_confirmation"),
                        "{context}: queued {row:?}"
                    );
                }
            }
        }
    }
    for (n, phone) in PHONES.iter().enumerate() {
        let confirmations = delivery::Entity::find()
            .filter(delivery::Column::Recipient.eq(*phone))
            .filter(delivery::Column::Subject.eq("opt_out_confirmation"))
            .count(&d.daemon().state().db)
            .await
            .unwrap();
        assert_eq!(
            confirmations,
            u64::from(model.confirmations[n]),
            "one confirmation per opt-out of number {n}: {steps:?}"
        );
    }
    d.stop().await.unwrap();
}

fn cases() -> u32 {
    std::env::var("CAREMSG_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 64,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn sms_authentication_follows_the_model(steps in proptest::collection::vec(step(), 1..16)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(run_case(steps));
    }
}
