//! `caremsgd bench events`: the CPU a portal message costs with no event stream open,
//! and with `streams` staff streams open (one per user, each patient's care team of
//! five among them), through the real HTTP API on SQLite. The senders and the stream
//! readers run on the load generator's own thread; the daemon's CPU is the process's
//! minus that thread's.
//!
//! Rounds without streams and rounds with them alternate (`ROUNDS_WITH` of each kind,
//! one more without), so that both kinds sit at the same mean position in a database
//! that grows with every round. The round right after the streams first open reads
//! each patient's audience once (cold) and is printed apart; the target is judged on
//! the mean of the steady rounds, streams that stay open all day. Every round is
//! printed with the writer's units per commit: the CPU a message costs depends on
//! how many messages share a commit, and that varies from round to round.
//!
//! The measured rounds are an open loop: messages are sent as they fall due, at a
//! fixed rate (by default half what the warm-up round's closed loop reached), so both
//! kinds of round carry the same traffic. In a closed loop (`--rate 0`) the daemon
//! runs at saturation, the streams' own CPU slows the senders, and the rounds with
//! streams carry less traffic in smaller commits than those without: that compares
//! two loads, not two costs of one message. Even in the open loop the two kinds commit
//! different batches, so the target is judged on the streams' own CPU: what they add
//! outside the writer's thread (it does no stream work), as a share of a message's
//! whole CPU without streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Staff users; a patient per five of them, each with a care team of five.
    pub users: usize,
    /// Staff streams to hold open, one per user from the first on (at most `users`).
    pub streams: usize,
    /// Portal messages per round.
    pub messages: usize,
    /// Concurrent senders in the warm-up round (and in every round, closed loop, when
    /// `rate` is `Some(0.0)`).
    pub clients: usize,
    /// Messages per second in the measured rounds, sent as they fall due (an open
    /// loop); `None`: [`DEFAULT_LOAD`] of the rate the warm-up round reached;
    /// `Some(0.0)`: a closed loop of `clients` senders, as before the open loop.
    pub rate: Option<f64>,
    /// The streams' `events.coalesce`.
    pub coalesce: Duration,
}

/// Steady rounds with streams open; one more round without is run.
const ROUNDS_WITH: usize = 3;

/// One round's figures.
#[derive(Debug, Clone, Copy)]
struct Round {
    tag: &'static str,
    cpu_per_message: Duration,
    // Of which the writer's thread: it follows the batches the writer commits.
    writer_cpu_per_message: Duration,
    per_second: f64,
    reader_statements_per_message: f64,
    units_per_commit: f64,
}

impl Round {
    /// The mean of `rounds` (at least one).
    fn mean(rounds: &[Round]) -> Round {
        let n = rounds.len().max(1) as f64;
        let mean = |of: fn(&Round) -> f64| rounds.iter().map(of).sum::<f64>() / n;
        let mean_time =
            |of: fn(&Round) -> Duration| rounds.iter().map(of).sum::<Duration>().div_f64(n);
        Round {
            tag: "mean",
            cpu_per_message: mean_time(|r| r.cpu_per_message),
            writer_cpu_per_message: mean_time(|r| r.writer_cpu_per_message),
            per_second: mean(|r| r.per_second),
            reader_statements_per_message: mean(|r| r.reader_statements_per_message),
            units_per_commit: mean(|r| r.units_per_commit),
        }
    }
}

/// Figures of the events benchmark.
#[derive(Debug, Clone)]
pub struct Report {
    plan: Plan,
    // Every round, in the order run.
    rounds: Vec<Round>,
    without: Round,
    first: Round,
    with: Round,
    first_audience_reads: f64,
    // The warm-up round's closed-loop rate, and the measured rounds' rate (0: closed).
    warm_rate: f64,
    rate: f64,
    events_received: usize,
    chunks_received: usize,
    audience_reads: f64,
    // Events the hub wrote to a quiet stream's socket itself, in the steady rounds.
    written_directly: f64,
    floor: Floor,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let added =
            |round: Round| us(round.cpu_per_message) / us(self.without.cpu_per_message) - 1.0;
        let line = |f: &mut std::fmt::Formatter<'_>, name: &str, round: Round| {
            writeln!(
                f,
                "  {name:<22} CPU/message {:>6.0} µs   {:>6.0} messages/s   {:>5.1} units/commit   {:>5.2} reader statements/message",
                us(round.cpu_per_message),
                round.per_second,
                round.units_per_commit,
                round.reader_statements_per_message
            )
        };
        let load = if self.rate > 0.0 {
            format!(
                "sent at {:.0} messages/s as they fall due (an open loop; at most {MAX_IN_FLIGHT} in flight; the warm-up round's {} closed-loop clients reached {:.0}/s)",
                self.rate, self.plan.clients, self.warm_rate
            )
        } else {
            format!("from {} closed-loop clients", self.plan.clients)
        };
        writeln!(
            f,
            "events benchmark: SQLite, {} staff users, {} patients with care teams of 5, {} portal messages per round {load}, {} streams (events.coalesce {} ms)",
            self.plan.users,
            patients_of(self.plan.users),
            self.plan.messages,
            self.plan.streams,
            self.plan.coalesce.as_millis()
        )?;
        writeln!(
            f,
            "  every steady round, in the order run (none: no stream open; open: streams open):"
        )?;
        for round in &self.rounds {
            line(f, round.tag, *round)?;
        }
        let spread = |tag: &str| {
            let added: Vec<f64> = self
                .rounds
                .iter()
                .filter(|r| r.tag.starts_with(tag))
                .map(|r| added(*r) * 100.0)
                .collect();
            let min = added.iter().copied().fold(f64::INFINITY, f64::min);
            let max = added.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{min:+.1}% to {max:+.1}%")
        };
        line(f, "mean, no stream open", self.without)?;
        line(f, "mean, streams open", self.with)?;
        // The writer's thread apart: its CPU per message follows its batches, which
        // differ between the two kinds of round whatever the streams cost (larger with
        // streams in an open loop, smaller in a closed one), and it does no stream work.
        // The target is judged on the rest: the streams' own CPU.
        let outside = |round: Round| {
            us(round
                .cpu_per_message
                .saturating_sub(round.writer_cpu_per_message))
        };
        // The streams' own CPU per message, and as a share of a message's CPU.
        let own_us = outside(self.with) - outside(self.without);
        let own = own_us / us(self.without.cpu_per_message).max(f64::MIN_POSITIVE);
        writeln!(
            f,
            "  {} streams add {:+.1}% CPU per message, steady state (mean of {} rounds; each round against the mean without: {}); the writer's thread {:.0} -> {:.0} µs per message at {:.1} -> {:.1} units per commit",
            self.plan.streams,
            added(self.with) * 100.0,
            ROUNDS_WITH,
            spread("open"),
            us(self.without.writer_cpu_per_message),
            us(self.with.writer_cpu_per_message),
            self.without.units_per_commit,
            self.with.units_per_commit,
        )?;
        writeln!(
            f,
            "  the streams' own CPU, outside the writer's thread: {own_us:+.0} µs per message ({:.0} -> {:.0}), {:+.1}% of a message's CPU without streams   ({})",
            outside(self.without),
            outside(self.with),
            own * 100.0,
            if self.plan.streams == 0 {
                "a control: no stream was open; the figure is the method's own noise".to_owned()
            } else {
                format!("target < 10%: {}", super::verdict(own < 0.10))
            },
        )?;
        writeln!(
            f,
            "  {:+.1}% in the round right after they first opened ({} audience reads, one per patient)",
            added(self.first) * 100.0,
            self.first_audience_reads,
        )?;
        writeln!(
            f,
            "  events received on the streams in the steady rounds {} in {} reads ({:.2} events per read), {} of them ({:.1}%) written by their publisher straight to a quiet stream's socket; audience reads {}",
            self.events_received,
            self.chunks_received,
            self.events_received as f64 / self.chunks_received.max(1) as f64,
            self.written_directly,
            100.0 * self.written_directly / self.events_received.max(1) as f64,
            self.audience_reads
        )?;
        // The streams' cost per write, what the target allows a write, and the floor.
        let writes_per_message =
            self.chunks_received as f64 / (ROUNDS_WITH * self.plan.messages).max(1) as f64;
        let per_write = |d: f64| d / writes_per_message.max(f64::MIN_POSITIVE);
        let allowed = per_write(0.10 * us(self.without.cpu_per_message));
        let floor = us(self.floor.per_write);
        if self.chunks_received == 0 {
            writeln!(f, "  per write to a stream: no stream was written to")?;
        } else {
            writeln!(
                f,
                "  per write to a stream ({writes_per_message:.2} per message): the streams' own CPU {:.1} µs; the target allows {allowed:.1} µs",
                per_write(own_us),
            )?;
        }
        write!(
            f,
            "  the floor: one bare loopback TCP write of {} bytes to a waiting reader, {} writes over {} sockets, costs its writer {floor:.1} µs{}",
            self.floor.size,
            self.floor.writes,
            self.floor.sockets,
            if self.chunks_received == 0 {
                String::new()
            } else {
                format!(" ({:.2}x the target's allowance)", floor / allowed)
            }
        )
    }
}

/// The floor under a write to a stream on this machine ([`loopback_floor`]).
#[derive(Debug, Clone, Copy)]
struct Floor {
    size: usize,
    writes: usize,
    sockets: usize,
    per_write: Duration,
}

/// The CPU one bare loopback TCP write of `size` bytes costs its writer, measured on a
/// thread of its own: writes go round `sockets` connections whose readers (tasks on
/// `load`, the load generator's runtime) wait for them, in bursts of a commit's
/// deliveries ([`FLOOR_BURST`]) a millisecond apart. No HTTP, no async runtime on the
/// writer's side, none of the daemon's code: the system call and what the kernel does
/// for it on loopback — which includes the reader's side of TCP and waking the reader,
/// work a remote client's machine would do. Also counted: a `nanosleep` per burst.
async fn loopback_floor(
    load: &tokio::runtime::Handle,
    sockets: usize,
    size: usize,
    writes: usize,
) -> anyhow::Result<Floor> {
    let (sockets, size) = (sockets.max(1), size.max(1));
    let writes = writes.div_ceil(FLOOR_BURST).max(1) * FLOOR_BURST;
    // A backlog for every socket at once (std's is 128), then a blocking listener for
    // the writer's own thread.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let listener = socket
        .listen(u32::try_from(sockets).unwrap_or(u32::MAX))
        .context("the floor's listener")?
        .into_std()?;
    listener.set_nonblocking(false)?;
    let addr = listener.local_addr()?;
    let writer = std::thread::Builder::new()
        .name("bench-floor".into())
        .spawn(move || -> anyhow::Result<Duration> {
            let mut accepted = Vec::with_capacity(sockets);
            for _ in 0..sockets {
                let (socket, _) = listener.accept()?;
                // As the daemon's connections (`http.rs`).
                socket.set_nodelay(true)?;
                accepted.push(socket);
            }
            let chunk = vec![b'x'; size];
            let thread_cpu = || {
                std::fs::read_to_string("/proc/thread-self/stat")
                    .map_or(Duration::ZERO, |stat| super::ticks(&stat))
            };
            let before = thread_cpu();
            for burst in 0..writes / FLOOR_BURST {
                for k in 0..FLOOR_BURST {
                    let socket = &mut accepted[(burst * FLOOR_BURST + k) % sockets];
                    std::io::Write::write_all(socket, &chunk)?;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(thread_cpu().saturating_sub(before))
        })
        .context("the floor's writer thread")?;
    let mut readers = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let socket = load
            .spawn(tokio::net::TcpStream::connect(addr))
            .await
            .context("the floor's reader")??;
        readers.push(load.spawn(async move {
            let mut socket = socket;
            let mut buf = vec![0u8; 64 * 1024];
            let mut read = 0;
            // Reads until the writer's thread closes its side.
            while let Ok(n @ 1..) = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await {
                read += n;
            }
            read
        }));
    }
    let spent = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the floor's writer thread panicked"))??;
    let mut read = 0;
    for reader in readers {
        read += reader.await?;
    }
    anyhow::ensure!(
        read == writes * size,
        "the floor's readers got {read} bytes of {}",
        writes * size
    );
    Ok(Floor {
        size,
        writes,
        sockets,
        per_write: spent / u32::try_from(writes).unwrap_or(u32::MAX),
    })
}

/// The floor's write size when no stream received anything (`--streams 0`): about a
/// message event and its notification.
const FLOOR_SIZE_WITHOUT_STREAMS: usize = 600;

/// Writes the floor makes, and how many at a time (about a commit's deliveries in
/// this benchmark: five streams for each of five or six messages).
const FLOOR_WRITES: usize = 50_000;
const FLOOR_BURST: usize = 25;

/// Runs the benchmark in a temporary state directory.
pub async fn run(plan: Plan) -> anyhow::Result<Report> {
    anyhow::ensure!(plan.users > 0, "--users must be at least 1");
    // Every figure is per message.
    anyhow::ensure!(plan.messages > 0, "--messages must be at least 1");
    anyhow::ensure!(
        plan.rate
            .is_none_or(|r| r == 0.0 || (r.is_finite() && r >= 1.0)),
        "--rate must be 0 (a closed loop) or at least 1 message per second"
    );
    anyhow::ensure!(
        plan.streams <= plan.users,
        "--streams ({}) cannot exceed --users ({}): one stream per user",
        plan.streams,
        plan.users
    );
    super::in_scratch_dir(|dir| async move { measure(plan, &dir).await }).await
}

async fn measure(plan: Plan, dir: &std::path::Path) -> anyhow::Result<Report> {
    let mut settings = super::scratch_settings(dir)?;
    settings.events.max_streams = plan.streams + 16;
    settings.events.coalesce = plan.coalesce;
    // Each stream holds a connection; past the cap the oldest idle ones are closed.
    settings.server.max_connections = settings
        .server
        .max_connections
        .max(plan.streams + plan.clients.max(MAX_IN_FLIGHT) + 64);
    let server = settings.server.clone();
    let running = crate::start(settings, crate::Options::default())
        .await
        .context("starting the daemon")?;
    let base = format!("http://{}", running.local_addr());
    let load_runtime = super::load_runtime(1)?;
    let load = load_runtime.handle().clone();
    let result = async {
        let client = super::http_client(&server, MAX_IN_FLIGHT)?;
        // The clinic does not depend on the streams: with `--streams 0` the same rounds
        // run on the same care teams, a control whose two kinds should agree.
        let patients = seed(&client, &base, plan.users).await?;
        let metric = |name: &'static str| {
            let metrics = running.state().metrics.render();
            metrics
                .lines()
                .find_map(|l| {
                    l.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or(0.0)
        };
        let round = |tag: &'static str, rate: f64| {
            let (client, base, load) = (client.clone(), base.clone(), load.clone());
            async move {
                // Each round starts on an idle daemon and counts the work it leaves
                // behind (`Cpu::settle`).
                super::Cpu::settle().await;
                let statements = metric("caremsg_db_reader_statements_total");
                let commits = metric("caremsg_writer_batch_units_count");
                let units = metric("caremsg_writer_batch_units_sum");
                let cpu = super::Cpu::read();
                let started = Instant::now();
                load.spawn(async move { send(&client, &base, plan, patients, tag, rate).await })
                    .await
                    .context("the senders")??;
                let took = started.elapsed();
                super::Cpu::settle().await;
                let statements = metric("caremsg_db_reader_statements_total") - statements;
                let after = super::Cpu::read();
                let writer = after.writer().saturating_sub(cpu.writer());
                let cpu = after.daemon().saturating_sub(cpu.daemon());
                let commits = metric("caremsg_writer_batch_units_count") - commits;
                let units = metric("caremsg_writer_batch_units_sum") - units;
                Ok::<_, anyhow::Error>(Round {
                    tag,
                    units_per_commit: units / commits.max(1.0),
                    cpu_per_message: cpu / plan.messages as u32,
                    writer_cpu_per_message: writer / plan.messages as u32,
                    per_second: plan.messages as f64 / took.as_secs_f64(),
                    reader_statements_per_message: statements / plan.messages as f64,
                })
            }
        };
        // A warm-up round, so every measured round finds the actors and caches warm; its
        // closed loop also finds the rate the measured rounds are sent at.
        let warm = round("warm", 0.0).await?;
        let rate = plan.rate.unwrap_or(DEFAULT_LOAD * warm.per_second);
        // The rounds without streams come before, between and after the rounds with
        // them: the database grows by every round, so the two kinds are compared at
        // the same mean position (the rounds with streams sit a little later, which
        // counts against them).
        let received = Arc::new(AtomicUsize::new(0));
        let chunks = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let open = || async {
            let mut readers = Vec::with_capacity(plan.streams);
            for user in 0..plan.streams {
                let (client, base) = (client.clone(), base.clone());
                let response = load
                    .spawn(async move {
                        client
                            .get(format!("{base}/v1/staff/events"))
                            .bearer_auth("dev-staff-token")
                            .header("X-Caremsg-User", format!("bu{user}"))
                            .send()
                            .await
                    })
                    .await
                    .context("opening a stream")??;
                anyhow::ensure!(
                    response.status().is_success(),
                    "stream {user}: {}",
                    response.status()
                );
                let (received, chunks, bytes) = (received.clone(), chunks.clone(), bytes.clone());
                readers.push(load.spawn(async move {
                    let mut response = response;
                    while let Ok(Some(chunk)) = response.chunk().await {
                        let events = chunk.windows(7).filter(|w| w == b"event: ").count();
                        received.fetch_add(events, Ordering::Relaxed);
                        chunks.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(chunk.len(), Ordering::Relaxed);
                    }
                }));
            }
            Ok::<_, anyhow::Error>(readers)
        };
        // Waits until every event of a round with streams is in (a message and a
        // notification per care-team member with a stream open: 10 per message when
        // every user has one), or for `deadline`.
        let expected = events_expected(plan);
        let all_in = |deadline: Duration| {
            let received = received.clone();
            async move {
                let deadline = Instant::now() + deadline;
                while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        // Waits for every event of a round with streams to arrive,
        // then closes the streams and waits until the daemon has let them all go.
        let close = |readers: Vec<tokio::task::JoinHandle<()>>| async move {
            all_in(Duration::from_secs(10)).await;
            for reader in &readers {
                reader.abort();
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while metric("caremsg_event_streams{kind=\"staff\"}") > 0.0 {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the daemon did not let the closed streams go"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, anyhow::Error>(())
        };
        // Distinct tags: each round's `client_txn_id`s are its own; a steady round's tag
        // begins with its kind (`none`, `open`), the means below select by it.
        const WITHOUT: [&str; ROUNDS_WITH + 1] = ["none1", "none2", "none3", "none4"];
        const WITH: [&str; ROUNDS_WITH] = ["open1", "open2", "open3"];
        let mut rounds = vec![round(WITHOUT[0], rate).await?];
        let mut first = None;
        let (mut events_received, mut chunks_received, mut bytes_received, mut audience_reads) =
            (0, 0, 0, 0.0);
        let mut written_directly = 0.0;
        for (k, tag) in WITH.into_iter().enumerate() {
            let readers = open().await?;
            if k == 0 {
                let audience = metric("caremsg_event_audience_reads_total");
                let round = round("first", rate).await?;
                first = Some((
                    round,
                    metric("caremsg_event_audience_reads_total") - audience,
                ));
                // Every event of the first round is in before the steady round counts.
                all_in(Duration::from_secs(10)).await;
            }
            received.store(0, Ordering::Relaxed);
            chunks.store(0, Ordering::Relaxed);
            bytes.store(0, Ordering::Relaxed);
            let audience = metric("caremsg_event_audience_reads_total");
            let direct = metric("caremsg_events_written_directly_total");
            rounds.push(round(tag, rate).await?);
            audience_reads += metric("caremsg_event_audience_reads_total") - audience;
            written_directly += metric("caremsg_events_written_directly_total") - direct;
            close(readers).await?;
            events_received += received.load(Ordering::Relaxed);
            chunks_received += chunks.load(Ordering::Relaxed);
            bytes_received += bytes.load(Ordering::Relaxed);
            rounds.push(round(WITHOUT[k + 1], rate).await?);
        }
        let (first, first_audience_reads) = first.context("no round with streams")?;
        // The floor, once the daemon is idle, with writes the size of the streams'.
        super::Cpu::settle().await;
        let size = bytes_received
            .checked_div(chunks_received)
            .unwrap_or(FLOOR_SIZE_WITHOUT_STREAMS);
        let floor = loopback_floor(&load, plan.streams, size, FLOOR_WRITES).await?;
        let of = |prefix: &str| {
            let kind: Vec<Round> = rounds
                .iter()
                .filter(|r| r.tag.starts_with(prefix))
                .copied()
                .collect();
            Round::mean(&kind)
        };
        Ok::<_, anyhow::Error>(Report {
            plan,
            without: of("none"),
            with: of("open"),
            first,
            rounds,
            first_audience_reads,
            warm_rate: warm.per_second,
            rate,
            events_received,
            chunks_received,
            audience_reads,
            written_directly,
            floor,
        })
    }
    .await;
    // Every load task has ended or was aborted; a runtime cannot be dropped inside
    // another.
    load_runtime.shutdown_background();
    running.shutdown().await?;
    result
}

/// Patients of a clinic of `users` staff users: one per five users (at least one).
fn patients_of(users: usize) -> usize {
    (users / 5).max(1)
}

/// The care team of patient `patient` ([`seed`]): five users by number (`users` is
/// at least 1: [`run`] refuses 0).
fn team_of(patient: usize, users: usize) -> impl Iterator<Item = usize> {
    (0..5).map(move |i| (patient * 5 + i) % users)
}

/// The events a round's messages put on the open streams: a message event and a
/// notification for each member of the patient's care team whose stream is open.
fn events_expected(plan: Plan) -> usize {
    let patients = patients_of(plan.users);
    (0..plan.messages)
        .map(|i| {
            2 * team_of(i % patients, plan.users)
                .filter(|user| *user < plan.streams)
                .count()
        })
        .sum()
}

/// One practice, `users` users and [`patients_of`] them portal-enrolled patients,
/// each with the care team [`team_of`], through the admin API. Returns the patients.
async fn seed(client: &reqwest::Client, base: &str, users: usize) -> anyhow::Result<usize> {
    let put = |path: String, body: serde_json::Value| async move {
        super::admin_put(client, base, &path, body).await
    };
    put(
        "/v1/admin/practices/bench".into(),
        serde_json::json!({"name": "Bench Clinic", "sms_enabled": false, "portal_enabled": true,
            "country": "US", "timezone": "America/New_York"}),
    )
    .await?;
    for user in 0..users {
        put(
            format!("/v1/admin/users/bu{user}"),
            serde_json::json!({"practice_id": "bench", "name": "Bench User", "restricted_programs": []}),
        )
        .await?;
    }
    let patients = patients_of(users);
    for patient in 0..patients {
        let team: Vec<String> = team_of(patient, users)
            .map(|user| format!("bu{user}"))
            .collect();
        put(
            format!("/v1/admin/patients/bp{patient}"),
            serde_json::json!({"practice_id": "bench", "first_name": "Bench", "last_name": "Patient",
                "date_of_birth": "1950-01-01", "portal_enrolled": true, "programs": [], "care_team": team}),
        )
        .await?;
    }
    Ok(patients)
}

/// `plan.messages` portal messages spread over the patients: at `rate` a second, each
/// sent when it falls due whatever the others' answers (an open loop, as patients send;
/// at most [`MAX_IN_FLIGHT`] at once, so a daemon that cannot keep up slows the round
/// instead of piling up requests), or from `plan.clients` closed-loop senders when
/// `rate` is 0.
async fn send(
    client: &reqwest::Client,
    base: &str,
    plan: Plan,
    patients: usize,
    tag: &'static str,
    rate: f64,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    if rate > 0.0 {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        let start = tokio::time::Instant::now();
        for i in 0..plan.messages {
            let due = Duration::try_from_secs_f64(i as f64 / rate)
                .context("a message falls due past the end of time")?;
            tokio::time::sleep_until(start + due).await;
            let permit = in_flight.clone().acquire_owned().await?;
            let (client, base) = (client.clone(), base.to_owned());
            tasks.spawn(async move {
                let _permit = permit;
                send_one(&client, &base, patients, tag, i).await
            });
            while let Some(sent) = tasks.try_join_next() {
                sent??;
            }
        }
    } else {
        let next = Arc::new(AtomicUsize::new(0));
        for _ in 0..plan.clients {
            let (client, base, next) = (client.clone(), base.to_owned(), next.clone());
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= plan.messages {
                        return Ok::<_, anyhow::Error>(());
                    }
                    send_one(&client, &base, patients, tag, i).await?;
                }
            });
        }
    }
    while let Some(sent) = tasks.join_next().await {
        sent??;
    }
    Ok(())
}

/// Portal message `i` of round `tag`, to patient `i % patients`.
async fn send_one(
    client: &reqwest::Client,
    base: &str,
    patients: usize,
    tag: &str,
    i: usize,
) -> anyhow::Result<()> {
    let response = client
        .post(format!("{base}/v1/portal/patients/bp{}/messages", i % patients))
        .bearer_auth("dev-portal-token")
        .json(&serde_json::json!({"body": "A question about my medication.", "client_txn_id": format!("{tag}{i}")}))
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == reqwest::StatusCode::CREATED,
        "send: {}",
        response.status()
    );
    Ok(())
}

/// The measured rounds' default rate, as a share of the warm-up round's closed-loop
/// rate: room for the streams' own CPU on the same cores, so that both kinds of round
/// carry the same traffic and the writer commits the same batches.
const DEFAULT_LOAD: f64 = 0.5;

/// Requests an open-loop round has in flight at most.
const MAX_IN_FLIGHT: usize = 256;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed test.

    use super::*;

    fn plan(users: usize, streams: usize, messages: usize) -> Plan {
        Plan {
            users,
            streams,
            messages,
            clients: 1,
            rate: None,
            coalesce: Duration::ZERO,
        }
    }

    #[test]
    fn every_member_with_a_stream_gets_the_message_and_its_notification() {
        assert_eq!(events_expected(plan(2_000, 2_000, 5_000)), 50_000);
        // The control: the same clinic, no stream open.
        assert_eq!(events_expected(plan(2_000, 0, 5_000)), 0);
        // Two patients: the first's team (users 0-4) has streams, the second's (5-9)
        // has none.
        assert_eq!(events_expected(plan(10, 5, 4)), 20);
    }

    #[tokio::test]
    async fn the_floor_writes_every_byte_to_its_readers() {
        let load = crate::bench::load_runtime(1).unwrap();
        let floor = loopback_floor(load.handle(), 3, 700, 60).await.unwrap();
        // Whole bursts: 60 writes round up to three bursts of 25.
        assert_eq!((floor.writes, floor.sockets, floor.size), (75, 3, 700));
        load.shutdown_background();
    }

    #[tokio::test]
    async fn no_messages_and_rates_that_are_not_rates_are_refused() {
        let err = run(plan(10, 5, 0)).await.unwrap_err();
        assert!(err.to_string().contains("--messages"), "{err}");
        for rate in [-1.0, 0.5, 1e-300, f64::NAN, f64::INFINITY] {
            let err = run(Plan {
                rate: Some(rate),
                ..plan(10, 5, 10)
            })
            .await
            .unwrap_err();
            assert!(err.to_string().contains("--rate"), "{rate}: {err}");
        }
    }

    #[tokio::test]
    async fn more_streams_than_users_is_refused() {
        let err = run(plan(10, 11, 1)).await.unwrap_err();
        assert!(err.to_string().contains("--streams"), "{err}");
    }
}
