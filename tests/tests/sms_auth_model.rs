//! A state-machine property test of SMS authentication: random sequences of staff
//! actions, patient replies, clock advances and daemon restarts, run against the real
//! daemon and a simple model of SPEC.md. After every step: the status is the model's;
//! never more than three wrong attempts; `failed` exactly at the third wrong reply or
//! at the window's end; and no text is ever queued for an opted-out number except its
//! single opt-out confirmation.
//!
//! Each case starts a daemon, so the case count is small by default;
//! `CAREMSG_PROPTEST_CASES` raises it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::sync::atomic::{AtomicU32, Ordering};

use caremsg_entities::{DeliveryChannel, delivery, practice_sms_number};
use caremsg_tests::{STAFF_TOKEN, TestDaemon};
use caremsgd::gateways::inbound::{InboundSms, route};
use caremsgd::phi::Phi;
use proptest::prelude::*;
use reqwest::{Method, StatusCode};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::Value;

const PHONE: &str = "+12015550123";

#[derive(Debug, Clone)]
enum Step {
    Start,
    Resend,
    StaffOptOut,
    Correct,
    Wrong,
    Stop,
    Help,
    OptIn,
    Advance(u32),
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Start),
        1 => Just(Step::Resend),
        1 => Just(Step::StaffOptOut),
        2 => Just(Step::Correct),
        4 => Just(Step::Wrong),
        1 => Just(Step::Stop),
        1 => Just(Step::Help),
        1 => Just(Step::OptIn),
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
}

/// SPEC.md's rules, for one patient on one number.
#[derive(Debug)]
struct Model {
    status: Status,
    attempts: u32,
    /// Days since the start of the case when the pending window ends.
    window_end: u32,
    now: u32,
    number_opted_out: bool,
    confirmations: u32,
}

impl Model {
    fn routed(&self, keyword: bool) -> bool {
        matches!(self.status, Status::Pending | Status::Enabled)
            || (keyword
                && matches!(
                    self.status,
                    Status::OptedOutByPatient | Status::OptedOutByStaff
                ))
    }

    /// Applies `step`; returns the HTTP status staff should get for staff actions.
    fn apply(&mut self, step: &Step) -> Option<u16> {
        match step {
            Step::Start => {
                if self.status == Status::OptedOutByPatient {
                    return Some(409);
                }
                if self.status == Status::Pending || self.number_opted_out {
                    return Some(409);
                }
                self.status = Status::Pending;
                self.attempts = 0;
                self.window_end = self.now + 14;
                Some(200)
            }
            Step::Resend => {
                if self.status != Status::Pending || self.number_opted_out {
                    return Some(409);
                }
                self.window_end = self.now + 14;
                Some(200)
            }
            Step::StaffOptOut => {
                if matches!(
                    self.status,
                    Status::OptedOutByPatient | Status::OptedOutByStaff
                ) {
                    return Some(409);
                }
                self.status = Status::OptedOutByStaff;
                Some(200)
            }
            Step::Correct => {
                if self.status == Status::Pending {
                    self.status = Status::Enabled;
                }
                None
            }
            Step::Wrong => {
                if self.status == Status::Pending {
                    self.attempts += 1;
                    if self.attempts == 3 {
                        self.status = Status::Failed;
                    }
                }
                None
            }
            Step::Stop => {
                if self.routed(true) {
                    self.status = Status::OptedOutByPatient;
                }
                if !self.number_opted_out {
                    self.number_opted_out = true;
                    self.confirmations += 1;
                }
                None
            }
            Step::Help => None,
            Step::OptIn => {
                let was_opted_out = self.number_opted_out;
                if self.routed(true)
                    && (was_opted_out
                        || matches!(
                            self.status,
                            Status::OptedOutByPatient | Status::OptedOutByStaff
                        ))
                {
                    self.status = Status::Pending;
                    self.attempts = 0;
                    self.window_end = self.now + 14;
                    self.number_opted_out = false;
                } else if self.status == Status::Pending {
                    // START while pending is a wrong attempt.
                    self.attempts += 1;
                    if self.attempts == 3 {
                        self.status = Status::Failed;
                    }
                } else if was_opted_out {
                    self.number_opted_out = false;
                }
                None
            }
            Step::Advance(days) => {
                self.now += days;
                if self.status == Status::Pending && self.now >= self.window_end {
                    self.status = Status::Failed;
                }
                None
            }
            Step::Restart => None,
        }
    }
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

async fn text(d: &TestDaemon, body: &str) {
    let to = practice_sms_number::Entity::find()
        .filter(practice_sms_number::Column::PracticeId.eq("p1"))
        .one(&d.daemon().state().db)
        .await
        .unwrap()
        .unwrap()
        .number;
    let sms = InboundSms {
        gateway: "loopback".into(),
        provider_message_id: format!("m-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        from: Phi::new(PHONE.to_owned()),
        to: Phi::new(to),
        body: Phi::new(body.to_owned()),
    };
    route(d.daemon().state(), sms).await.unwrap();
}

async fn staff(d: &TestDaemon, action: &str) -> StatusCode {
    let (status, _) = d
        .call_as(
            Method::POST,
            &format!("/v1/staff/patients/pat1/sms/{action}"),
            Some(STAFF_TOKEN),
            Some("u1"),
            None,
        )
        .await;
    status
}

async fn view(d: &TestDaemon) -> Value {
    d.call_as(
        Method::GET,
        "/v1/staff/patients/pat1/sms",
        Some(STAFF_TOKEN),
        Some("u1"),
        None,
    )
    .await
    .1
}

async fn sms_rows(d: &TestDaemon) -> Vec<delivery::Model> {
    delivery::Entity::find()
        .filter(delivery::Column::Recipient.eq(PHONE))
        .filter(delivery::Column::Channel.eq(DeliveryChannel::Sms))
        .all(&d.daemon().state().db)
        .await
        .unwrap()
}

async fn run_case(steps: Vec<Step>) {
    let mut d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    d.patient("p1", "pat1", &[], &["u1"]).await;
    let mut model = Model {
        status: Status::None,
        attempts: 0,
        window_end: 0,
        now: 0,
        number_opted_out: false,
        confirmations: 0,
    };
    for (i, step) in steps.iter().enumerate() {
        let before = sms_rows(&d).await.len();
        let expected = model.apply(step);
        let got = match step {
            Step::Start => Some(staff(&d, "start").await),
            Step::Resend => Some(staff(&d, "resend").await),
            Step::StaffOptOut => Some(staff(&d, "opt-out").await),
            Step::Correct => {
                text(&d, "04/07/1950").await;
                None
            }
            Step::Wrong => {
                text(&d, "01/01/1901").await;
                None
            }
            Step::Stop => {
                text(&d, "STOP").await;
                None
            }
            Step::Help => {
                text(&d, "HELP").await;
                None
            }
            Step::OptIn => {
                text(&d, "START").await;
                None
            }
            Step::Advance(days) => {
                d.clock.advance(chrono::Duration::days(i64::from(*days)));
                d.daemon().tick_timers().await.unwrap();
                None
            }
            Step::Restart => {
                d.restart().await.unwrap();
                None
            }
        };
        let context = format!("step {i} {step:?} of {steps:?}, model {model:?}");
        if let (Some(expected), Some(got)) = (expected, got) {
            assert_eq!(got.as_u16(), expected, "{context}");
        }
        let v = view(&d).await;
        assert_eq!(
            v["status"].as_str(),
            Some(model.status.name()),
            "{context}: {v}"
        );
        assert!(v["attempts"].as_i64().unwrap() <= 3, "{context}: {v}");
        if model.status == Status::Pending {
            assert_eq!(
                v["attempts"].as_i64(),
                Some(i64::from(model.attempts)),
                "{context}: {v}"
            );
        }
        // While the number is opted out, nothing new is queued for it but its one
        // confirmation (a START that restores consent is followed by its opt-in text).
        let rows = sms_rows(&d).await;
        if model.number_opted_out {
            for row in &rows[before..] {
                assert_eq!(
                    row.subject.as_deref(),
                    Some("opt_out_confirmation"),
                    "{context}: queued {row:?}"
                );
            }
        }
    }
    let confirmations = delivery::Entity::find()
        .filter(delivery::Column::Recipient.eq(PHONE))
        .filter(delivery::Column::Subject.eq("opt_out_confirmation"))
        .count(&d.daemon().state().db)
        .await
        .unwrap();
    assert_eq!(
        confirmations,
        u64::from(model.confirmations),
        "one confirmation per opt-out"
    );
    d.stop().await.unwrap();
}

fn cases() -> u32 {
    std::env::var("CAREMSG_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sms_authentication_follows_the_model(steps in proptest::collection::vec(step(), 1..14)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(run_case(steps));
    }
}
