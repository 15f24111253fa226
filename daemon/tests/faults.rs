//! The fault-injection suite: the real `caremsgd` binary as a child process, driven
//! through its HTTP API and the loopback SMS gateway while real faults hit it —
//! SIGKILL under load, a full disk, SQLite's write lock held by another process, its
//! PostgreSQL connections terminated, a storm of replayed webhooks, a storm of
//! reloads. After each fault every acknowledged write is read back: stored exactly
//! once, sequences gapless, no text sent twice. Each test prints its figures.
//!
//! Gated by `CAREMSG_FAULTS=1` (`.ci/run` sets it on both legs); without it each test
//! says it is skipped. Scaled by `CAREMSG_FAULTS_ROUNDS` (SIGKILL rounds, 50),
//! `CAREMSG_FAULTS_REPLAY_POSTS` (10,000), `CAREMSG_FAULTS_SIGHUPS` (1,000),
//! `CAREMSG_FAULTS_PG_KILLS` (20); `CAREMSG_FAULTS_SEED` fixes the random choices.
//! The database is a SQLite file, or a fresh PostgreSQL database when `DATABASE_URL`
//! names a server; the disk-full and write-lock tests are SQLite's, the connection
//! kill PostgreSQL's.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

mod faults_support;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use caremsg_entities::{SmsStatus, patient};
use faults_support::{
    Answer, Api, Daemon, Kind, Launch, Ledger, Op, Request, Store, Tmpfs, enabled, phone,
    practice_number, read_back, read_outbox, scaled, serial, sms_start, tally,
};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect};
use serde_json::json;

/// The staff user of every test.
const USER: &str = "u1";

fn rng(test: &str) -> StdRng {
    let seed = std::env::var("CAREMSG_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{test}: seed {seed} (CAREMSG_FAULTS_SEED)");
    StdRng::seed_from_u64(seed)
}

/// A load worker: sends what `next` makes until `stop`, recording each answer.
fn worker(
    api: Api,
    ledger: Ledger,
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    mut next: impl FnMut(usize) -> Option<(Kind, String, String, Request)> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            let Some((kind, patient, key, request)) = next(i) else {
                break;
            };
            i += 1;
            let answer = api.call(&request).await;
            if answer.ok() {
                acked.fetch_add(1, Ordering::SeqCst);
            }
            let refused = matches!(answer, Answer::NotSent);
            ledger.push(Op {
                kind,
                patient,
                key,
                request,
                answer,
                retried: None,
            });
            if refused {
                break;
            }
        }
    })
}

/// Polls `condition` every 5 ms until it holds; panics after `limit`.
async fn until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The SMS status of each of `patients`.
async fn sms_statuses(
    db: &sea_orm::DatabaseConnection,
    patients: &[String],
) -> BTreeMap<String, SmsStatus> {
    let rows: Vec<(String, SmsStatus)> = patient::Entity::find()
        .select_only()
        .column(patient::Column::Id)
        .column(patient::Column::SmsStatus)
        .filter(patient::Column::Id.is_in(patients.iter().cloned()))
        .into_tuple()
        .all(db)
        .await
        .unwrap();
    rows.into_iter().collect()
}

/// The clinic most tests use: practice `fp`, user [`USER`], `portal` portal-only
/// patients `pp{i}` and `sms` SMS-enabled, SMS-only patients `ps{i}` (phones 0..).
async fn clinic(api: &Api, portal: usize, sms: usize) -> (Vec<String>, Vec<(String, String)>) {
    api.practice("fp", &practice_number(0)).await;
    api.user("fp", USER).await;
    let mut portal_patients = Vec::new();
    for i in 0..portal {
        let id = format!("pp{i}");
        api.patient("fp", &id, USER, None, true).await;
        portal_patients.push(id);
    }
    let mut sms_patients = Vec::new();
    for i in 0..sms {
        let id = format!("ps{i}");
        let number = phone(i);
        api.patient("fp", &id, USER, Some(&number), false).await;
        api.enable_sms(&id, USER, &number, &practice_number(0))
            .await;
        sms_patients.push((id, number));
    }
    (portal_patients, sms_patients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_acknowledged_write() {
    const TEST: &str = "sigkill_under_load";
    if !enabled(TEST) {
        return;
    }
    let _serial = serial();
    let rounds = scaled("CAREMSG_FAULTS_ROUNDS", 50);
    let mut rng = rng(TEST);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path()).await;
    let launch = Launch::new(&store, dir.path(), dir.path(), "");
    let began = Instant::now();
    let mut daemon = Daemon::start(&launch, None).await;
    let api = daemon.api();
    let (portal, sms) = clinic(&api, 4, 4).await;
    let practice = practice_number(0);
    let db = store.connect().await;
    let ledger = Ledger::default();
    let mut patients: Vec<String> = portal.iter().cloned().collect();
    patients.extend(sms.iter().map(|(id, _)| id.clone()));
    let mut fresh: Vec<String> = Vec::new();
    let (mut restart_total, mut restart_max) = (Duration::ZERO, Duration::ZERO);
    let mut retried = 0;
    let mut retry_503 = 0;
    let mut in_flight = 0;

    // Time spent creating patients, under load until the kill, restarting, checking.
    let mut phases = [Duration::ZERO; 4];
    for round in 0..rounds {
        let phase = Instant::now();
        // Two patients whose SMS authentication starts (and is answered) in this
        // round; created before the fault.
        let api = daemon.api();
        let mut starters = Vec::new();
        for k in 0..2 {
            let id = format!("pn{round}x{k}");
            let number = phone(100 + round * 2 + k);
            api.patient("fp", &id, USER, Some(&number), false).await;
            patients.push(id.clone());
            fresh.push(id.clone());
            starters.push((id, number));
        }
        let from = ledger.all().len();
        let acked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..2 {
            let patient = portal[w].clone();
            workers.push(worker(
                api.clone(),
                ledger.clone(),
                acked.clone(),
                stop.clone(),
                move |i| {
                    let body = format!("FK-r{round}-portal{w}-{i}");
                    let request = Request::portal_send(&patient, &body);
                    Some((Kind::Portal, patient.clone(), body, request))
                },
            ));
            // Staff: one SMS-only patient (a text goes out), one portal-only patient.
            let targets = [sms[w].0.clone(), portal[w + 2].clone()];
            workers.push(worker(
                api.clone(),
                ledger.clone(),
                acked.clone(),
                stop.clone(),
                move |i| {
                    let patient = targets[i % 2].clone();
                    let body = format!("FK-r{round}-staff{w}-{i}");
                    let request = Request::staff_send(&patient, USER, &body);
                    Some((Kind::Staff, patient, body, request))
                },
            ));
            let (patient, number) = sms[w + 2].clone();
            let practice = practice.clone();
            workers.push(worker(
                api.clone(),
                ledger.clone(),
                acked.clone(),
                stop.clone(),
                move |i| {
                    let id = format!("fk-in-r{round}-{w}-{i}");
                    let body = format!("FK-r{round}-text{w}-{i}");
                    let request = Request::inbound(&number, &practice, &body, &id);
                    Some((Kind::Inbound, patient.clone(), id, request))
                },
            ));
        }
        // SMS starts, each followed by the date-of-birth reply once it is answered.
        {
            let (api, ledger, acked, stop) =
                (api.clone(), ledger.clone(), acked.clone(), stop.clone());
            let practice = practice.clone();
            workers.push(tokio::spawn(async move {
                for (patient, number) in starters {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let request = sms_start(&patient, USER);
                    let answer = api.call(&request).await;
                    let started = answer.ok();
                    if started {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    ledger.push(Op {
                        kind: Kind::SmsStart,
                        patient: patient.clone(),
                        key: patient.clone(),
                        request,
                        answer,
                        retried: None,
                    });
                    if !started {
                        return;
                    }
                    let id = format!("fk-dob-{patient}");
                    let request =
                        Request::inbound(&number, &practice, faults_support::DOB_REPLY, &id);
                    let answer = api.call(&request).await;
                    if answer.ok() {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    ledger.push(Op {
                        kind: Kind::DobReply,
                        patient,
                        key: id,
                        request,
                        answer,
                        retried: None,
                    });
                }
            }));
        }
        // The fault: SIGKILL once a random number of writes has been acknowledged.
        phases[0] += phase.elapsed();
        let phase = Instant::now();
        let target = rng.random_range(4..40);
        until("the load makes progress", Duration::from_secs(60), || {
            acked.load(Ordering::SeqCst) >= target
        })
        .await;
        daemon.kill();
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.await.unwrap();
        }

        phases[1] += phase.elapsed();
        let restarting = Instant::now();
        daemon = Daemon::start(&launch, None).await;
        let took = restarting.elapsed();
        restart_total += took;
        restart_max = restart_max.max(took);
        phases[2] += took;
        let phase = Instant::now();
        let api = daemon.api();
        let ops = ledger.all();
        in_flight += ops[from..]
            .iter()
            .filter(|op| matches!(op.answer, Answer::Unknown(_)))
            .count();
        // Before any retry: nothing acknowledged lost, nothing in flight stored twice.
        read_back(&db, &ops, &patients)
            .await
            .assert_clean(&format!("round {round}, after the restart"));
        let retries = ledger.retry_unanswered(&api, from, 50).await;
        assert!(
            retries.failed.is_empty(),
            "round {round}: retries failed: {:?}",
            retries.failed
        );
        retried += retries.sent;
        retry_503 += retries.unavailable;
        let ops = ledger.all();
        read_back(&db, &ops, &patients)
            .await
            .assert_clean(&format!("round {round}, after the retries"));
        // An answered start left the patient pending (or enabled); an answered
        // date-of-birth reply enabled the patient.
        let statuses = sms_statuses(&db, &fresh).await;
        for op in &ops {
            let status = statuses.get(&op.patient);
            match op.kind {
                Kind::SmsStart if op.acked() => assert!(
                    matches!(status, Some(SmsStatus::Pending | SmsStatus::Enabled)),
                    "round {round}: {} answered started, now {status:?}",
                    op.patient
                ),
                Kind::DobReply if op.acked() => assert_eq!(
                    status,
                    Some(&SmsStatus::Enabled),
                    "round {round}: {} confirmed",
                    op.patient
                ),
                _ => {}
            }
        }
        let outbox = read_outbox(&dir.path().join("loopback-outbox.jsonl"), "FK-");
        assert!(
            outbox.twice.is_empty(),
            "round {round}: texts sent twice: {:?}",
            outbox.twice
        );
        phases[3] += phase.elapsed();
    }

    // A last read-back after a clean stop and start.
    assert!(daemon.stop(), "a clean exit after the last round");
    let daemon = Daemon::start(&launch, None).await;
    let ops = ledger.all();
    let readback = read_back(&db, &ops, &patients).await;
    readback.assert_clean("after the final restart");
    let outbox = read_outbox(&dir.path().join("loopback-outbox.jsonl"), "FK-");
    assert!(
        outbox.twice.is_empty(),
        "texts sent twice: {:?}",
        outbox.twice
    );
    let by_kind = ops
        .iter()
        .fold(BTreeMap::<String, usize>::new(), |mut m, op| {
            *m.entry(format!("{:?}", op.kind)).or_default() += 1;
            m
        });
    println!(
        "{TEST}: {rounds} rounds ({}); {} writes {by_kind:?}, {} acknowledged, answers {:?}; \
         {in_flight} in flight at the kill, {retried} retried ({retry_503} × 503 on the way); \
         {} messages stored, lost 0, duplicates 0, gaps 0; outbox {} lines ({} torn), \
         texts sent twice 0; restart {:?} on average, {:?} at most; {:?} in all (patients {:?}, load {:?}, \
         restarts {:?}, checks {:?})",
        if store.sqlite_file().is_some() {
            "SQLite"
        } else {
            "PostgreSQL"
        },
        ops.len(),
        ops.iter().filter(|op| op.acked()).count(),
        tally(ops.iter().map(|op| &op.answer)),
        readback.stored,
        outbox.lines,
        outbox.torn,
        restart_total / rounds.max(1) as u32,
        restart_max,
        began.elapsed(),
        phases[0],
        phases[1],
        phases[2],
        phases[3],
    );
    assert!(daemon.stop());
    db.close().await.unwrap();
    store.drop_database().await;
}

/// Sends 8,000-character portal and staff messages from four workers until `full`
/// of them have failed, 600 at most (4.8 MB: more than the 4 MiB disk holds, so a
/// daemon that acknowledges writes it does not store cannot keep this test going);
/// returns (answered 2xx, failed).
async fn fill(
    api: &Api,
    ledger: &Ledger,
    phase: &str,
    patients: &[String],
    full: usize,
) -> (usize, usize) {
    let acked = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (api, ledger, acked, failed, stop) = (
            api.clone(),
            ledger.clone(),
            acked.clone(),
            failed.clone(),
            stop.clone(),
        );
        let patient = patients[w % patients.len()].clone();
        let phase = phase.to_owned();
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && i < 150 {
                let head = format!("DF-{phase}-{w}-{i}-");
                let body = format!("{head}{}", "x".repeat(8000 - head.len()));
                i += 1;
                let (kind, request) = if w == 3 {
                    (Kind::Staff, Request::staff_send(&patient, USER, &body))
                } else {
                    (Kind::Portal, Request::portal_send(&patient, &body))
                };
                let answer = api.call(&request).await;
                if answer.ok() {
                    acked.fetch_add(1, Ordering::SeqCst);
                } else if failed.fetch_add(1, Ordering::SeqCst) + 1 >= full {
                    stop.store(true, Ordering::SeqCst);
                }
                ledger.push(Op {
                    kind,
                    patient: patient.clone(),
                    key: body,
                    request,
                    answer,
                    retried: None,
                });
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    (acked.load(Ordering::SeqCst), failed.load(Ordering::SeqCst))
}

/// Sends messages until one is answered 2xx (10 s at most, without a restart), then
/// `more` of them, which must all be 2xx; returns the failures before the first 2xx.
async fn recovers(api: &Api, ledger: &Ledger, phase: &str, patient: &str, more: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failures = 0;
    let mut i = 0;
    loop {
        let body = format!("DF-{phase}-back-{i}");
        i += 1;
        let request = Request::portal_send(patient, &body);
        let answer = api.call(&request).await;
        let ok = answer.ok();
        ledger.push(Op {
            kind: Kind::Portal,
            patient: patient.to_owned(),
            key: body,
            request,
            answer: answer.clone(),
            retried: None,
        });
        if ok {
            break;
        }
        failures += 1;
        assert!(
            Instant::now() < deadline,
            "{phase}: no write succeeded within 10 s after space came back; last: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..more {
        let body = format!("DF-{phase}-back-{i}");
        i += 1;
        let request = Request::portal_send(patient, &body);
        let answer = api.call(&request).await;
        assert!(
            answer.ok(),
            "{phase}: a write after space came back: {answer:?}"
        );
        ledger.push(Op {
            kind: Kind::Portal,
            patient: patient.to_owned(),
            key: body,
            request,
            answer,
            retried: None,
        });
    }
    failures
}

async fn integrity_check(db: &sea_orm::DatabaseConnection) -> String {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Sqlite,
            "PRAGMA integrity_check",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index::<String>(0).unwrap()
}

/// Free bytes on the file system holding `path`.
fn available(path: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full_and_back_loses_no_acknowledged_write() {
    const TEST: &str = "disk_full";
    if !enabled(TEST) {
        return;
    }
    if std::env::var("DATABASE_URL").is_ok_and(|u| u.starts_with("postgres")) {
        println!("{TEST}: skipped on PostgreSQL (the state folder holds the SQLite file)");
        return;
    }
    let _serial = serial();
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = match Tmpfs::mount(&dir.path().join("state"), "4m") {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            println!("{TEST}: skipped: mounting a tmpfs was refused ({reason}); run as root");
            return;
        }
    };
    let store = Store::Sqlite(tmpfs.path.join("caremsg.db"));
    let launch = Launch::new(&store, &tmpfs.path, dir.path(), "");
    let daemon = Daemon::start(&launch, None).await;
    let api = daemon.api();
    api.practice("fp", &practice_number(0)).await;
    api.user("fp", USER).await;
    let patients = ["dp1".to_owned(), "dp2".to_owned()];
    for p in &patients {
        api.patient("fp", p, USER, None, true).await;
    }
    let ledger = Ledger::default();

    // Full: the 4 MiB fill up.
    let (acked1, failed1) = fill(&api, &ledger, "full1", &patients, 12).await;
    let ready_full1 = api.readyz().await;
    tmpfs.resize("32m");
    let back1 = recovers(&api, &ledger, "space1", &patients[0], 20).await;
    let ready_back1 = api.readyz().await;

    // Full again: a ballast file takes all but 64 KiB.
    let ballast = tmpfs.path.join("ballast");
    let free = available(&tmpfs.path);
    std::fs::write(&ballast, vec![0u8; free.saturating_sub(64 * 1024) as usize]).unwrap_or(());
    let (acked2, failed2) = fill(&api, &ledger, "full2", &patients, 12).await;
    let ready_full2 = api.readyz().await;
    std::fs::remove_file(&ballast).unwrap();
    let back2 = recovers(&api, &ledger, "space2", &patients[1], 20).await;
    let ready_back2 = api.readyz().await;

    let ops = ledger.all();
    let failures: Vec<&Answer> = ops
        .iter()
        .map(|op| &op.answer)
        .filter(|a| !a.ok())
        .collect();
    let statuses = tally(failures.iter().copied());
    let db = store.connect().await;
    let live = read_back(&db, &ops, &patients).await;
    let integrity_live = integrity_check(&db).await;
    db.close().await.unwrap();
    let clean_exit = daemon.stop();
    let daemon = Daemon::start(&launch, None).await;
    let db = store.connect().await;
    let restarted = read_back(&db, &ops, &patients).await;
    let integrity = integrity_check(&db).await;
    db.close().await.unwrap();
    let api = daemon.api();
    let after = api
        .call(&Request::portal_send(&patients[0], "DF-after-restart"))
        .await;
    println!(
        "{TEST}: {} writes; first fill {acked1} acknowledged then {failed1} failed, second fill \
         {acked2} then {failed2}; failures {statuses:?}; /readyz while full {ready_full1:?} / \
         {ready_full2:?}, after space came back {ready_back1:?} / \
         {ready_back2:?}; {back1} and {back2} failures before the first 2xx after space came \
         back; {} stored, lost {} (after a restart {}), duplicates {}, stored after an error {}; \
         integrity {integrity_live} / {integrity}; clean exit {clean_exit}; {:?}",
        ops.len(),
        live.stored,
        live.lost.len(),
        restarted.lost.len(),
        live.duplicates.len(),
        live.stored_after_error.len(),
        began.elapsed(),
    );
    live.assert_clean("while the daemon ran on");
    restarted.assert_clean("after a restart");
    assert_eq!(integrity_live, "ok");
    assert_eq!(integrity, "ok");
    assert!(after.ok(), "a write after the restart: {after:?}");
    assert!(failed1 > 0 && failed2 > 0, "the disk never filled");
    assert!(
        failures.iter().all(|a| a.status() == Some(503)),
        "a full disk answers 503 storage_unavailable, not {statuses:?}"
    );
    assert!(
        failures
            .iter()
            .all(|a| a.json()["error"]["code"] == "storage_unavailable"),
        "error code: {:?}",
        failures.first()
    );
    assert_eq!(
        (ready_full1, ready_full2),
        (Some(503), Some(503)),
        "/readyz while full"
    );
    assert!(clean_exit, "SIGTERM exits 0");
    assert!(daemon.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_lock_held_past_the_busy_timeout_answers_503_and_stores_nothing() {
    const TEST: &str = "write_lock";
    if !enabled(TEST) {
        return;
    }
    if std::env::var("DATABASE_URL").is_ok_and(|u| u.starts_with("postgres")) {
        println!("{TEST}: skipped on PostgreSQL (SQLite's file lock)");
        return;
    }
    use sqlx::{Connection, Executor};
    let _serial = serial();
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::Sqlite(dir.path().join("caremsg.db"));
    let launch = Launch::new(&store, dir.path(), dir.path(), "")
        .with_env("CAREMSG__DATABASE__BUSY_TIMEOUT", "300ms");
    let daemon = Daemon::start(&launch, None).await;
    let api = daemon.api();
    let (portal, _) = clinic(&api, 2, 0).await;
    let ledger = Ledger::default();
    let mut locked_answers = Vec::new();
    let mut held = Duration::ZERO;
    for cycle in 0..3 {
        let mut lock = sqlx::SqliteConnection::connect(&format!(
            "sqlite://{}",
            store.sqlite_file().unwrap().display()
        ))
        .await
        .unwrap();
        lock.execute("BEGIN IMMEDIATE").await.unwrap();
        let since = Instant::now();
        let sends: Vec<(Kind, String, String, Request)> = (0..6)
            .map(|i| {
                let patient = portal[i % 2].clone();
                let body = format!("WL-{cycle}-locked-{i}");
                if i % 3 == 2 {
                    (
                        Kind::Staff,
                        patient.clone(),
                        body.clone(),
                        Request::staff_send(&patient, USER, &body),
                    )
                } else {
                    (
                        Kind::Portal,
                        patient.clone(),
                        body.clone(),
                        Request::portal_send(&patient, &body),
                    )
                }
            })
            .collect();
        let answers = futures::future::join_all(sends.iter().map(|(_, _, _, r)| api.call(r))).await;
        held += since.elapsed();
        lock.execute("ROLLBACK").await.unwrap();
        lock.close().await.unwrap();
        for ((kind, patient, key, request), answer) in sends.into_iter().zip(answers) {
            locked_answers.push(answer.clone());
            ledger.push(Op {
                kind,
                patient,
                key,
                request,
                answer,
                retried: None,
            });
        }
        // Once the lock is gone, every write is acknowledged and stored.
        for i in 0..6 {
            let patient = portal[i % 2].clone();
            let body = format!("WL-{cycle}-free-{i}");
            let request = Request::portal_send(&patient, &body);
            let answer = api.call(&request).await;
            assert!(
                answer.ok(),
                "cycle {cycle}: a write after the lock was released: {answer:?}"
            );
            ledger.push(Op {
                kind: Kind::Portal,
                patient,
                key: body,
                request,
                answer,
                retried: None,
            });
        }
    }
    let ops = ledger.all();
    let db = store.connect().await;
    let live = read_back(&db, &ops, &portal).await;
    db.close().await.unwrap();
    assert!(daemon.stop());
    let daemon = Daemon::start(&launch, None).await;
    let db = store.connect().await;
    let restarted = read_back(&db, &ops, &portal).await;
    db.close().await.unwrap();
    let statuses = tally(&locked_answers);
    println!(
        "{TEST}: 3 cycles, lock held {held:?} in all (busy timeout 300 ms); answers while \
         locked {statuses:?}; {} writes, {} acknowledged, {} stored, lost {}, stored after an \
         error {}; {:?}",
        ops.len(),
        ops.iter().filter(|op| op.acked()).count(),
        live.stored,
        live.lost.len(),
        live.stored_after_error.len(),
        began.elapsed(),
    );
    live.assert_clean("while the daemon ran on");
    restarted.assert_clean("after a restart");
    assert!(
        live.stored_after_error.is_empty(),
        "writes answered with an error were stored: {:?}",
        live.stored_after_error
    );
    assert!(
        locked_answers
            .iter()
            .all(|a| a.status() == Some(503) && a.json()["error"]["code"] == "storage_unavailable"),
        "writes while the lock is held answer 503 storage_unavailable: {statuses:?}, e.g. {:?}",
        locked_answers.iter().find(|a| a.status() != Some(503))
    );
    assert!(daemon.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connections_killed_under_load_leave_no_phantom() {
    const TEST: &str = "postgres_kill";
    if !enabled(TEST) {
        return;
    }
    let Ok(server) = std::env::var("DATABASE_URL") else {
        println!("{TEST}: skipped (PostgreSQL only; DATABASE_URL is not set)");
        return;
    };
    if !server.starts_with("postgres") {
        println!("{TEST}: skipped (PostgreSQL only)");
        return;
    }
    let _serial = serial();
    let kills = scaled("CAREMSG_FAULTS_PG_KILLS", 20);
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path()).await;
    let name = store.postgres_name().unwrap().to_owned();
    let launch = Launch::new(&store, dir.path(), dir.path(), "");
    let daemon = Daemon::start(&launch, None).await;
    let api = daemon.api();
    let (portal, sms) = clinic(&api, 4, 2).await;
    let practice = practice_number(0);
    let mut patients = portal.clone();
    patients.extend(sms.iter().map(|(id, _)| id.clone()));
    let ledger = Ledger::default();
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..2 {
        let patient = portal[w].clone();
        workers.push(worker(
            api.clone(),
            ledger.clone(),
            acked.clone(),
            stop.clone(),
            move |i| {
                let body = format!("PK-portal{w}-{i}");
                Some((
                    Kind::Portal,
                    patient.clone(),
                    body.clone(),
                    Request::portal_send(&patient, &body),
                ))
            },
        ));
        let patient = portal[w + 2].clone();
        workers.push(worker(
            api.clone(),
            ledger.clone(),
            acked.clone(),
            stop.clone(),
            move |i| {
                let body = format!("PK-staff{w}-{i}");
                Some((
                    Kind::Staff,
                    patient.clone(),
                    body.clone(),
                    Request::staff_send(&patient, USER, &body),
                ))
            },
        ));
        let (patient, number) = sms[w].clone();
        let practice = practice.clone();
        workers.push(worker(
            api.clone(),
            ledger.clone(),
            acked.clone(),
            stop.clone(),
            move |i| {
                let id = format!("pk-in-{w}-{i}");
                let body = format!("PK-text{w}-{i}");
                Some((
                    Kind::Inbound,
                    patient.clone(),
                    id.clone(),
                    Request::inbound(&number, &practice, &body, &id),
                ))
            },
        ));
    }
    let admin = sea_orm::Database::connect(&server).await.unwrap();
    let mut terminated = 0u64;
    let mut last = 0;
    for k in 0..kills {
        // Each kill waits for 15 more acknowledged writes: the daemon recovered from the
        // previous one.
        let target = last + 15;
        until(
            &format!("the daemon recovers after kill {k}"),
            Duration::from_secs(60),
            || acked.load(Ordering::SeqCst) >= target,
        )
        .await;
        last = acked.load(Ordering::SeqCst);
        let rows = admin
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                ),
            ))
            .await
            .unwrap();
        terminated += rows.len() as u64;
    }
    let target = last + 15;
    until(
        "the daemon recovers after the last kill",
        Duration::from_secs(60),
        || acked.load(Ordering::SeqCst) >= target,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    admin.close().await.unwrap();
    let ops = ledger.all();
    let db = store.connect().await;
    let before = read_back(&db, &ops, &patients).await;
    let retries = ledger.retry_unanswered(&api, 0, 50).await;
    let ops = ledger.all();
    let after = read_back(&db, &ops, &patients).await;
    db.close().await.unwrap();
    let statuses = tally(ops.iter().map(|op| &op.answer));
    println!(
        "{TEST}: {kills} kills, {terminated} backends terminated; {} writes, answers \
         {statuses:?}; {} retried ({} × 503 on the way); {} stored, lost {}, duplicates {}, \
         stored after an error {}; {:?}",
        ops.len(),
        retries.sent,
        retries.unavailable,
        after.stored,
        before.lost.len(),
        after.duplicates.len(),
        before.stored_after_error.len(),
        began.elapsed(),
    );
    let server_errors = ops
        .iter()
        .filter(|op| op.answer.status() == Some(500))
        .fold(BTreeMap::<String, usize>::new(), |mut m, op| {
            *m.entry(format!(
                "{:?} {}",
                op.kind,
                op.answer.json()["error"]["code"]
            ))
            .or_default() += 1;
            m
        });
    println!("{TEST}: 500s by kind: {server_errors:?}");
    if !before.stored_after_error.is_empty() {
        println!(
            "{TEST}: stored though answered with an error: {:?}",
            before.stored_after_error
        );
    }
    before.assert_clean("after the kills");
    after.assert_clean("after the retries");
    assert!(
        retries.failed.is_empty(),
        "retries failed: {:?}",
        retries.failed
    );
    assert!(
        ops.iter().all(|op| op.answer.status() != Some(500)),
        "a lost connection answers 503 storage_unavailable, never 500: {statuses:?}"
    );
    assert!(daemon.stop());
    store.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_webhooks_are_stored_exactly_once() {
    const TEST: &str = "webhook_replay";
    if !enabled(TEST) {
        return;
    }
    let _serial = serial();
    let posts = scaled("CAREMSG_FAULTS_REPLAY_POSTS", 10_000);
    let mut rng = rng(TEST);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path()).await;
    let launch = Launch::new(&store, dir.path(), dir.path(), "");
    let daemon = Daemon::start(&launch, None).await;
    let api = daemon.api();
    let (_, sms) = clinic(&api, 0, 10).await;
    let practice = practice_number(0);
    // Ten SMS-enabled patients (their conversations) and ten numbers that are no
    // patient's (the unmatched log).
    let senders: Vec<(Kind, String, String)> = sms
        .iter()
        .map(|(id, number)| (Kind::Inbound, id.clone(), number.clone()))
        .chain((0..10).map(|k| (Kind::Unmatched, String::new(), phone(900 + k))))
        .collect();
    let mut ids: Vec<Op> = Vec::new();
    let mut sends: Vec<usize> = Vec::new();
    while sends.len() < posts {
        let k = ids.len();
        let (kind, patient, number) = senders[k % senders.len()].clone();
        let id = format!("rp-{k}");
        let request = Request::inbound(&number, &practice, &format!("RP-{k} hello"), &id);
        ids.push(Op {
            kind,
            patient,
            key: id,
            request,
            answer: Answer::NotSent,
            retried: None,
        });
        for _ in 0..rng.random_range(1..=5) {
            sends.push(k);
        }
    }
    sends.truncate(posts);
    sends.shuffle(&mut rng);
    let began = Instant::now();
    let unavailable = Arc::new(AtomicUsize::new(0));
    let requests: Vec<Request> = ids.iter().map(|op| op.request.clone()).collect();
    let results: Vec<(usize, Answer)> = futures::stream::iter(sends.iter().copied())
        .map(|k| {
            let (api, request, unavailable) =
                (api.clone(), requests[k].clone(), unavailable.clone());
            async move {
                let mut answer = api.call(&request).await;
                for _ in 0..100 {
                    if answer.status() != Some(503) {
                        break;
                    }
                    unavailable.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    answer = api.call(&request).await;
                }
                (k, answer)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let took = began.elapsed();
    let failed: Vec<&Answer> = results.iter().map(|(_, a)| a).filter(|a| !a.ok()).collect();
    for (k, answer) in &results {
        if answer.ok() {
            ids[*k].answer = answer.clone();
        }
    }
    let patients: Vec<String> = sms.iter().map(|(id, _)| id.clone()).collect();
    let db = store.connect().await;
    let readback = read_back(&db, &ids, &patients).await;
    db.close().await.unwrap();
    println!(
        "{TEST}: {posts} posts of {} provider ids (1–5 each) from 20 numbers, 64 at a time, in \
         {took:?} ({:.0}/s); {} × 503 retried; failed {}; {} messages stored, lost {}, \
         duplicates {}",
        ids.len(),
        posts as f64 / took.as_secs_f64(),
        unavailable.load(Ordering::SeqCst),
        failed.len(),
        readback.stored,
        readback.lost.len(),
        readback.duplicates.len(),
    );
    assert!(
        failed.is_empty(),
        "posts not answered 200: {:?}",
        tally(failed.iter().copied())
    );
    readback.assert_clean("after the replay");
    assert!(daemon.stop());
    store.drop_database().await;
}

/// Reads notifications until one contains `wanted` (30 s at most); returns them.
fn notified(socket: &UnixDatagram, wanted: &str) -> String {
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains(wanted) {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {wanted:?} from the daemon ({e}); got {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_storm_under_load_fails_no_request() {
    const TEST: &str = "reload_storm";
    if !enabled(TEST) {
        return;
    }
    let _serial = serial();
    let sighups = scaled("CAREMSG_FAULTS_SIGHUPS", 1000);
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path()).await;
    let launch = Launch::new(&store, dir.path(), dir.path(), "");
    let valid = std::fs::read_to_string(&launch.config).unwrap();
    assert!(valid.contains("max_attempts = 3"));
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let daemon = Daemon::start(&launch, Some(&socket_path)).await;
    notified(&socket, "READY=1");
    let api = daemon.api();
    let (portal, _) = clinic(&api, 3, 0).await;

    let ledger = Ledger::default();
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..2 {
        let patient = portal[w].clone();
        workers.push(worker(
            api.clone(),
            ledger.clone(),
            acked.clone(),
            stop.clone(),
            move |i| {
                let body = format!("RS-portal{w}-{i}");
                Some((
                    Kind::Portal,
                    patient.clone(),
                    body.clone(),
                    Request::portal_send(&patient, &body),
                ))
            },
        ));
    }
    let patient = portal[2].clone();
    workers.push(worker(
        api.clone(),
        ledger.clone(),
        acked.clone(),
        stop.clone(),
        move |i| {
            let body = format!("RS-staff-{i}");
            Some((
                Kind::Staff,
                patient.clone(),
                body.clone(),
                Request::staff_send(&patient, USER, &body),
            ))
        },
    ));
    let reads = Arc::new(AtomicUsize::new(0));
    let read_failures = Arc::new(std::sync::Mutex::new(Vec::<Answer>::new()));
    {
        let (api, stop, reads, read_failures) = (
            api.clone(),
            stop.clone(),
            reads.clone(),
            read_failures.clone(),
        );
        let patient = portal[0].clone();
        workers.push(tokio::spawn(async move {
            let request = Request::staff(
                Method::GET,
                format!("/v1/staff/patients/{patient}/conversation?limit=5"),
                USER,
                None,
            );
            while !stop.load(Ordering::SeqCst) {
                let answer = api.call(&request).await;
                reads.fetch_add(1, Ordering::SeqCst);
                if !answer.ok() {
                    read_failures.lock().unwrap().push(answer);
                }
            }
        }));
    }

    // Invalid files, in turn: not TOML; a value out of range; an unknown field; a
    // change to a field that needs a restart.
    let invalid = |n: usize, text: &str| -> String {
        match n % 4 {
            0 => format!("{text}\n[[[ this is not TOML\n"),
            1 => text.replace("max_attempts = 3", "max_attempts = 0"),
            2 => text.replace("max_attempts = 3", "max_attempts = 3\nno_such_setting = 1"),
            _ => text.replace(&format!("127.0.0.1:{}", launch.port), "127.0.0.1:1"),
        }
    };
    let sms_view = Request::staff(
        Method::GET,
        format!("/v1/staff/patients/{}/sms", portal[0]),
        USER,
        None,
    );
    let mut in_force = 3;
    let mut refused = 0;
    let mut wrong = Vec::new();
    let (mut reload_total, mut reload_max) = (Duration::ZERO, Duration::ZERO);
    for n in 0..sighups {
        let bad = n % 10 == 9;
        let attempts = 3 + (n % 5);
        let text = valid.replace("max_attempts = 3", &format!("max_attempts = {attempts}"));
        let text = if bad { invalid(n / 10, &valid) } else { text };
        let tmp = launch.config.with_extension("toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &launch.config).unwrap();
        let since = Instant::now();
        daemon.signal("-HUP");
        let said = notified(&socket, "READY=1");
        let took = since.elapsed();
        reload_total += took;
        reload_max = reload_max.max(took);
        if bad {
            refused += 1;
            if !said.contains("reload refused") {
                wrong.push(format!(
                    "sighup {n}: an invalid file was not refused: {said:?}"
                ));
            }
        } else {
            in_force = attempts;
        }
        let view = api.call(&sms_view).await;
        if view.json()["max_attempts"].as_u64() != Some(in_force as u64) {
            wrong.push(format!(
                "sighup {n}: max_attempts {} in force, {:?} answered",
                in_force,
                view.json()["max_attempts"]
            ));
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let ops = ledger.all();
    let failed: Vec<&Answer> = ops
        .iter()
        .map(|op| &op.answer)
        .filter(|a| !a.ok())
        .collect();
    let db = store.connect().await;
    let readback = read_back(&db, &ops, &portal).await;
    db.close().await.unwrap();
    let read_failures = read_failures.lock().unwrap().clone();
    println!(
        "{TEST}: {sighups} SIGHUPs ({refused} with an invalid file), reload {:?} on average, \
         {reload_max:?} at most; under load: {} writes, {} reads, failed {}; {} stored, lost {}; \
         wrong config in force {}; {:?}",
        reload_total / sighups.max(1) as u32,
        ops.len(),
        reads.load(Ordering::SeqCst),
        failed.len() + read_failures.len(),
        readback.stored,
        readback.lost.len(),
        wrong.len(),
        began.elapsed(),
    );
    assert!(
        failed.is_empty() && read_failures.is_empty(),
        "requests failed during the storm: writes {:?}, reads {:?}",
        tally(failed.iter().copied()),
        tally(&read_failures)
    );
    assert!(wrong.is_empty(), "{:?}", &wrong[..wrong.len().min(5)]);
    readback.assert_clean("after the storm");
    // The last valid file is in force; the daemon exits cleanly.
    std::fs::write(&launch.config, &valid).unwrap();
    assert!(daemon.stop());
    store.drop_database().await;
}

#[test]
fn the_harness_reads_an_outbox_and_spots_a_text_sent_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.jsonl");
    std::fs::write(
        &path,
        [
            json!({"id": "lb-1", "body": "FK-a"}).to_string(),
            json!({"id": "lb-2", "body": "FK-b"}).to_string(),
            json!({"id": "lb-3", "body": "FK-a"}).to_string(),
            json!({"id": "lb-4", "body": "opt-in", "delivery_id": "d1"}).to_string(),
            json!({"id": "lb-5", "body": "opt-in", "delivery_id": "d2"}).to_string(),
            json!({"id": "lb-6", "body": "FK-c", "delivery_id": "d1"}).to_string(),
            "{\"id\": \"lb-7\", \"bo".to_owned(),
        ]
        .join("\n"),
    )
    .unwrap();
    let outbox = read_outbox(&path, "FK-");
    assert_eq!(outbox.lines, 7);
    assert_eq!(outbox.torn, 1);
    assert_eq!(outbox.twice, ["body FK-a ×2", "delivery d1 ×2"]);
}
