//! The reload diff: which fields a new configuration changes, and whether all of them
//! can change without a restart.
//!
//! Every struct is destructured without `..`, so adding a field to the settings does
//! not compile until this file says whether a reload may change it.

use crate::settings::{
    ApiClient, Conversations, Database, Events, Gateway, Ha, Log, Notifications, Retention, Server,
    Settings, SmsAuth, Writer,
};

/// A reload changed a field that only a restart can change; the old settings stay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` changed, which needs a restart; the running configuration is kept")]
pub struct ReloadRefused {
    /// Dotted path of the first non-reloadable field found changed, e.g. `server.listen`
    /// or `gateways[1].library`; `gateways` when instances were added or removed.
    pub field: String,
}

/// Walks two settings in step, recording changed reloadable fields and stopping at the
/// first changed non-reloadable one.
struct Diff {
    changed: Vec<String>,
}

impl Diff {
    /// A field a reload may change.
    fn reloadable<T: PartialEq>(&mut self, field: impl Into<String>, old: &T, new: &T) {
        if old != new {
            self.changed.push(field.into());
        }
    }

    /// A field only a restart may change.
    fn fixed<T: PartialEq>(
        &mut self,
        field: impl Into<String>,
        old: &T,
        new: &T,
    ) -> Result<(), ReloadRefused> {
        if old == new {
            Ok(())
        } else {
            Err(ReloadRefused {
                field: field.into(),
            })
        }
    }
}

/// Compares the running settings with newly loaded (and validated) ones.
///
/// Returns the dotted paths of the reloadable fields that changed, in file order (empty:
/// nothing to do). Whole lists and tables are reported as one field: `clients`,
/// `sms_auth.templates.help`, `gateways[0].rate_limit`, `gateways[0].config`. Gateways are
/// matched by position and reported by index into `new.gateways`.
///
/// Refuses with the first non-reloadable field that changed: `state_dir`,
/// `server.listen`, `database.*`, `log.format`, `writer.*`, `ha.*`, `gateways` (an instance
/// added or removed), `gateways[i].name` (renamed or reordered), and a gateway's `kind`,
/// `library` or `concurrency`.
pub fn reload_plan(old: &Settings, new: &Settings) -> Result<Vec<String>, ReloadRefused> {
    let mut d = Diff {
        changed: Vec::new(),
    };
    let Settings {
        state_dir,
        server,
        database,
        log,
        clients,
        writer,
        conversations,
        sms_auth,
        notifications,
        retention,
        events,
        gateways,
        ha,
    } = new;

    d.fixed("state_dir", &old.state_dir, state_dir)?;
    diff_server(&mut d, &old.server, server)?;
    diff_database(&mut d, &old.database, database)?;
    diff_log(&mut d, &old.log, log)?;
    diff_clients(&mut d, &old.clients, clients);
    diff_writer(&mut d, &old.writer, writer)?;
    diff_conversations(&mut d, &old.conversations, conversations);
    diff_sms_auth(&mut d, &old.sms_auth, sms_auth);
    diff_notifications(&mut d, &old.notifications, notifications);
    diff_retention(&mut d, &old.retention, retention);
    diff_events(&mut d, &old.events, events);
    diff_gateways(&mut d, &old.gateways, gateways)?;
    diff_ha(&mut d, &old.ha, ha)?;
    Ok(d.changed)
}

fn diff_server(d: &mut Diff, old: &Server, new: &Server) -> Result<(), ReloadRefused> {
    let Server {
        listen,
        public_url,
        request_timeout,
        max_body_bytes,
        shutdown_timeout,
        sse_keepalive,
        header_read_timeout,
        idle_timeout,
        send_timeout,
        max_connections,
    } = new;
    d.fixed("server.listen", &old.listen, listen)?;
    d.reloadable("server.public_url", &old.public_url, public_url);
    d.reloadable(
        "server.request_timeout",
        &old.request_timeout,
        request_timeout,
    );
    d.reloadable("server.max_body_bytes", &old.max_body_bytes, max_body_bytes);
    d.reloadable(
        "server.shutdown_timeout",
        &old.shutdown_timeout,
        shutdown_timeout,
    );
    d.reloadable("server.sse_keepalive", &old.sse_keepalive, sse_keepalive);
    d.reloadable(
        "server.header_read_timeout",
        &old.header_read_timeout,
        header_read_timeout,
    );
    d.reloadable("server.idle_timeout", &old.idle_timeout, idle_timeout);
    d.reloadable("server.send_timeout", &old.send_timeout, send_timeout);
    d.reloadable(
        "server.max_connections",
        &old.max_connections,
        max_connections,
    );
    Ok(())
}

fn diff_database(d: &mut Diff, old: &Database, new: &Database) -> Result<(), ReloadRefused> {
    let Database {
        url,
        max_connections,
        busy_timeout,
        connect_timeout,
    } = new;
    d.fixed("database.url", &old.url, url)?;
    d.fixed(
        "database.max_connections",
        &old.max_connections,
        max_connections,
    )?;
    d.fixed("database.busy_timeout", &old.busy_timeout, busy_timeout)?;
    d.fixed(
        "database.connect_timeout",
        &old.connect_timeout,
        connect_timeout,
    )
}

fn diff_log(d: &mut Diff, old: &Log, new: &Log) -> Result<(), ReloadRefused> {
    let Log { level, format } = new;
    d.reloadable("log.level", &old.level, level);
    d.fixed("log.format", &old.format, format)
}

fn diff_clients(d: &mut Diff, old: &[ApiClient], new: &[ApiClient]) {
    new.iter().for_each(client_fields_all_reloadable);
    d.reloadable("clients", &old, &new);
}

/// Every field of a client is reloadable and the list is swapped as a whole. Naming the
/// fields here makes a new `ApiClient` field need a decision too.
fn client_fields_all_reloadable(client: &ApiClient) {
    let ApiClient {
        name: _,
        token_sha256: _,
        scopes: _,
        practices: _,
    } = client;
}

fn diff_events(d: &mut Diff, old: &Events, new: &Events) {
    let Events {
        max_streams,
        max_streams_per_subscriber,
        buffer,
        idle_timeout,
        coalesce,
        direct_writes,
    } = new;
    d.reloadable("events.max_streams", &old.max_streams, max_streams);
    d.reloadable(
        "events.max_streams_per_subscriber",
        &old.max_streams_per_subscriber,
        max_streams_per_subscriber,
    );
    d.reloadable("events.buffer", &old.buffer, buffer);
    d.reloadable("events.idle_timeout", &old.idle_timeout, idle_timeout);
    d.reloadable("events.coalesce", &old.coalesce, coalesce);
    d.reloadable("events.direct_writes", &old.direct_writes, direct_writes);
}

fn diff_writer(d: &mut Diff, old: &Writer, new: &Writer) -> Result<(), ReloadRefused> {
    let Writer {
        max_batch_units,
        queue_depth,
    } = new;
    d.fixed(
        "writer.max_batch_units",
        &old.max_batch_units,
        max_batch_units,
    )?;
    d.fixed("writer.queue_depth", &old.queue_depth, queue_depth)
}

fn diff_ha(d: &mut Diff, old: &Ha, new: &Ha) -> Result<(), ReloadRefused> {
    let Ha {
        mode,
        lease_renew,
        lease_expiry,
    } = new;
    d.fixed("ha.mode", &old.mode, mode)?;
    d.fixed("ha.lease_renew", &old.lease_renew, lease_renew)?;
    d.fixed("ha.lease_expiry", &old.lease_expiry, lease_expiry)
}

fn diff_conversations(d: &mut Diff, old: &Conversations, new: &Conversations) {
    let Conversations {
        idle_timeout,
        max_live,
        sms_body_max_chars,
        portal_body_max_chars,
    } = new;
    d.reloadable(
        "conversations.idle_timeout",
        &old.idle_timeout,
        idle_timeout,
    );
    d.reloadable("conversations.max_live", &old.max_live, max_live);
    d.reloadable(
        "conversations.sms_body_max_chars",
        &old.sms_body_max_chars,
        sms_body_max_chars,
    );
    d.reloadable(
        "conversations.portal_body_max_chars",
        &old.portal_body_max_chars,
        portal_body_max_chars,
    );
}

fn diff_retention(d: &mut Diff, old: &Retention, new: &Retention) {
    let Retention {
        operational,
        unmatched_inbound,
        prune_interval,
        prune_batch,
    } = new;
    d.reloadable("retention.operational", &old.operational, operational);
    d.reloadable(
        "retention.unmatched_inbound",
        &old.unmatched_inbound,
        unmatched_inbound,
    );
    d.reloadable(
        "retention.prune_interval",
        &old.prune_interval,
        prune_interval,
    );
    d.reloadable("retention.prune_batch", &old.prune_batch, prune_batch);
}

fn diff_sms_auth(d: &mut Diff, old: &SmsAuth, new: &SmsAuth) {
    let SmsAuth {
        max_attempts,
        window,
        templates,
    } = new;
    d.reloadable("sms_auth.max_attempts", &old.max_attempts, max_attempts);
    d.reloadable("sms_auth.window", &old.window, window);
    let crate::settings::SmsTemplates {
        confirmed,
        wrong_reply,
        failed,
        help,
        opted_out,
    } = templates;
    let old = &old.templates;
    d.reloadable("sms_auth.templates.confirmed", &old.confirmed, confirmed);
    d.reloadable(
        "sms_auth.templates.wrong_reply",
        &old.wrong_reply,
        wrong_reply,
    );
    d.reloadable("sms_auth.templates.failed", &old.failed, failed);
    d.reloadable("sms_auth.templates.help", &old.help, help);
    d.reloadable("sms_auth.templates.opted_out", &old.opted_out, opted_out);
}

fn diff_notifications(d: &mut Diff, old: &Notifications, new: &Notifications) {
    let Notifications {
        unread_reminder_after,
        email_gateway,
        link_base_url,
        email_subject,
        email_body,
    } = new;
    d.reloadable(
        "notifications.unread_reminder_after",
        &old.unread_reminder_after,
        unread_reminder_after,
    );
    d.reloadable(
        "notifications.email_gateway",
        &old.email_gateway,
        email_gateway,
    );
    d.reloadable(
        "notifications.link_base_url",
        &old.link_base_url,
        link_base_url,
    );
    d.reloadable(
        "notifications.email_subject",
        &old.email_subject,
        email_subject,
    );
    d.reloadable("notifications.email_body", &old.email_body, email_body);
}

fn diff_gateways(d: &mut Diff, old: &[Gateway], new: &[Gateway]) -> Result<(), ReloadRefused> {
    for (i, (old, new)) in old.iter().zip(new).enumerate() {
        let at = |field: &str| format!("gateways[{i}].{field}");
        let Gateway {
            name,
            kind,
            library,
            config,
            concurrency,
            allowed_hosts,
            rate_limit,
            per_recipient,
            auto_answers_per_sender,
            health_interval,
            down_fails_readiness,
        } = new;
        d.fixed(at("name"), &old.name, name)?;
        d.fixed(at("kind"), &old.kind, kind)?;
        d.fixed(at("library"), &old.library, library)?;
        d.reloadable(at("config"), &old.config, config);
        d.fixed(at("concurrency"), &old.concurrency, concurrency)?;
        d.reloadable(at("allowed_hosts"), &old.allowed_hosts, allowed_hosts);
        d.reloadable(at("rate_limit"), &old.rate_limit, rate_limit);
        d.reloadable(at("per_recipient"), &old.per_recipient, per_recipient);
        d.reloadable(
            at("auto_answers_per_sender"),
            &old.auto_answers_per_sender,
            auto_answers_per_sender,
        );
        d.reloadable(at("health_interval"), &old.health_interval, health_interval);
        d.reloadable(
            at("down_fails_readiness"),
            &old.down_fails_readiness,
            down_fails_readiness,
        );
    }
    d.fixed("gateways", &old.len(), &new.len())
}

#[cfg(test)]
#[allow(clippy::expect_used, reason = "a test fails loudly")]
mod tests {
    use super::*;
    use crate::settings::{GatewayKind, RateLimit};
    use std::path::PathBuf;
    use std::time::Duration;

    fn base() -> Settings {
        crate::from_toml_str(crate::EMBEDDED_DEFAULT).expect("embedded default")
    }

    fn plan(edit: impl FnOnce(&mut Settings)) -> Result<Vec<String>, ReloadRefused> {
        let old = base();
        let mut new = old.clone();
        edit(&mut new);
        reload_plan(&old, &new)
    }

    fn refused(edit: impl FnOnce(&mut Settings)) -> String {
        plan(edit).expect_err("refused").field
    }

    #[test]
    fn nothing_changed_is_an_empty_plan() {
        assert_eq!(plan(|_| {}), Ok(Vec::new()));
    }

    #[test]
    fn reloadable_changes_are_listed() {
        assert_eq!(
            plan(|s| {
                s.log.level = "debug".into();
                s.sms_auth.window = Duration::from_secs(3600);
                s.clients.pop();
                s.gateways[0].rate_limit = Some(RateLimit {
                    per_second: 2.0,
                    burst: 4,
                });
                s.gateways[0].config = serde_json::json!({ "outbox": "elsewhere.jsonl" });
                s.sms_auth.templates.help = "{practice}: help".into();
            }),
            Ok(vec![
                "log.level".to_owned(),
                "clients".to_owned(),
                "sms_auth.window".to_owned(),
                "sms_auth.templates.help".to_owned(),
                "gateways[0].config".to_owned(),
                "gateways[0].rate_limit".to_owned(),
            ])
        );
    }

    #[test]
    fn non_reloadable_changes_are_refused_by_name() {
        assert_eq!(refused(|s| s.state_dir = PathBuf::from("/x")), "state_dir");
        assert_eq!(
            refused(|s| s.server.listen = "127.0.0.1:1".parse().expect("addr")),
            "server.listen"
        );
        assert_eq!(
            refused(|s| s.database.url = Some("postgres://x/y".into())),
            "database.url"
        );
        assert_eq!(
            refused(|s| s.database.max_connections = 1),
            "database.max_connections"
        );
        assert_eq!(
            refused(|s| s.log.format = crate::LogFormat::Json),
            "log.format"
        );
        assert_eq!(refused(|s| s.writer.queue_depth = 1), "writer.queue_depth");
        assert_eq!(
            refused(|s| s.gateways[0].library = PathBuf::from("other.so")),
            "gateways[0].library"
        );
        assert_eq!(
            refused(|s| s.gateways[0].kind = GatewayKind::Portal),
            "gateways[0].kind"
        );
        assert_eq!(
            refused(|s| s.gateways[0].concurrency = 1),
            "gateways[0].concurrency"
        );
        assert_eq!(
            refused(|s| s.gateways[0].name = "renamed".into()),
            "gateways[0].name"
        );
    }

    #[test]
    fn the_first_non_reloadable_change_is_named_even_with_reloadable_ones() {
        assert_eq!(
            refused(|s| {
                s.log.level = "debug".into();
                s.writer.max_batch_units = 1;
                s.gateways[0].library = PathBuf::from("other.so");
            }),
            "writer.max_batch_units"
        );
    }

    #[test]
    fn gateways_added_or_removed_are_refused() {
        assert_eq!(
            refused(|s| {
                let mut extra = s.gateways[0].clone();
                extra.name = "second".into();
                s.gateways.push(extra);
            }),
            "gateways"
        );
        assert_eq!(refused(|s| s.gateways.clear()), "gateways");
    }
}
