//! Tests that keep the docs and the committed config files true to the code: every field
//! documented (default, reloadability), every field listed in the production example,
//! commented defaults equal to the real ones, and "Reloadable: yes/no" matching
//! `reload_plan`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, File, FileFormat};
use serde_json::{Value, json};

use crate::settings::*;
use crate::{EMBEDDED_DEFAULT, from_toml_str, reload_plan};

const PRODUCTION: &str = include_str!("../caremsg.production.toml");

/// Tables whose keys belong to someone else (the plugin) and are not walked.
const OPAQUE: &[&str] = &["gateways.config"];

/// Settings with every `Option` set and one element in every list. Written without
/// `..Default::default()`, so a new field does not compile until it is added here.
fn full_settings() -> Settings {
    let limit = || {
        Some(RateLimit {
            per_second: 1.0,
            burst: 2,
        })
    };
    Settings {
        state_dir: PathBuf::from("state"),
        server: Server {
            listen: SocketAddr::from(([127, 0, 0, 1], 8680)),
            public_url: "http://127.0.0.1:8680".to_owned(),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1024,
            shutdown_timeout: Duration::from_secs(10),
            sse_keepalive: Duration::from_secs(15),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            max_connections: 1024,
        },
        database: Database {
            url: Some("postgres://caremsg@localhost/caremsg".to_owned()),
            max_connections: 8,
            busy_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
        },
        log: Log {
            level: "info".to_owned(),
            format: LogFormat::Text,
        },
        clients: vec![ApiClient {
            name: "a".to_owned(),
            token_sha256: crate::hash_token("a"),
            scopes: vec![Scope::Admin],
            practices: Some(vec!["p1".to_owned()]),
        }],
        writer: Writer {
            max_batch_units: 512,
            queue_depth: 8192,
        },
        retention: Retention {
            operational: Duration::from_secs(3600),
            unmatched_inbound: Duration::from_secs(7200),
            prune_interval: Duration::from_secs(60),
            prune_batch: 10,
        },
        conversations: Conversations {
            idle_timeout: Duration::from_secs(600),
            max_live: 10_000,
            sms_body_max_chars: 1600,
            portal_body_max_chars: 10_000,
        },
        sms_auth: SmsAuth {
            max_attempts: 3,
            window: Duration::from_secs(3600),
            templates: SmsTemplates {
                confirmed: "c".to_owned(),
                wrong_reply: "w".to_owned(),
                failed: "f".to_owned(),
                help: "h".to_owned(),
                opted_out: "o".to_owned(),
            },
        },
        notifications: Notifications {
            unread_reminder_after: Duration::from_secs(60),
            email_gateway: Some("g".to_owned()),
            link_base_url: "http://x/".to_owned(),
            email_subject: "s".to_owned(),
            email_body: "b".to_owned(),
        },
        events: Events {
            max_streams: 2048,
            max_streams_per_subscriber: 16,
            buffer: 256,
            idle_timeout: Duration::from_secs(1800),
            coalesce: Duration::from_millis(100),
            direct_writes: true,
        },
        gateways: vec![Gateway {
            name: "g".to_owned(),
            kind: GatewayKind::Email,
            library: PathBuf::from("g.so"),
            config: json!({ "key": "value" }),
            concurrency: 8,
            allowed_hosts: vec!["x.example".to_owned()],
            rate_limit: limit(),
            per_recipient: limit(),
            auto_answers_per_sender: limit(),
            health_interval: Duration::from_secs(30),
            down_fails_readiness: false,
        }],
        ha: Ha {
            mode: HaMode::ActivePassive,
            lease_renew: Duration::from_secs(5),
            lease_expiry: Duration::from_secs(15),
        },
    }
}

/// Dotted key paths of `value`'s leaves; list elements share their list's path
/// (`gateways.rate_limit.burst`).
fn key_paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        Value::Object(map) if !OPAQUE.contains(&prefix) => {
            for (key, child) in map {
                key_paths(child, &join(key), out);
            }
        }
        Value::Array(items) if items.iter().any(Value::is_object) => {
            for item in items {
                key_paths(item, prefix, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

/// Turns every commented-out setting (`# key = value`) into a set one; other comments
/// stay. The result of uncommenting a committed file must still be valid.
fn uncomment(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let setting = trimmed
            .strip_prefix('#')
            .map(|rest| rest.strip_prefix(' ').unwrap_or(rest))
            .filter(|rest| looks_like_setting(rest));
        out.push_str(setting.unwrap_or(line));
        out.push('\n');
    }
    out
}

fn looks_like_setting(line: &str) -> bool {
    let Some((key, _)) = line.split_once('=') else {
        return false;
    };
    let key = key.trim_end();
    !key.is_empty()
        && key.len() + 1 < line.len()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A TOML text as JSON, exactly as written (no defaults filled in).
fn toml_as_json(text: &str) -> Value {
    Config::builder()
        .add_source(File::from_str(text, FileFormat::Toml))
        .build()
        .and_then(Config::try_deserialize::<Value>)
        .expect("TOML parses")
}

fn settings_json(text: &str, what: &str) -> Value {
    let settings = from_toml_str(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    serde_json::to_value(settings).expect("serializes")
}

/// A gateway with only its required fields, for the defaults of the others.
fn default_gateway_json() -> Value {
    let text = "[[gateways]]\nname = \"g\"\nkind = \"sms\"\nlibrary = \"g.so\"\n";
    settings_json(text, "minimal gateway")["gateways"][0].clone()
}

/// The code's default for the field at JSON pointer `pointer`, if it has one.
fn default_at(pointer: &str) -> Option<Value> {
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    let value = match parts.as_slice() {
        ["gateways", _index, rest @ ..] => default_gateway_json()
            .pointer(&format!("/{}", rest.join("/")))
            .cloned(),
        ["clients", ..] => None,
        _ => serde_json::to_value(Settings::default())
            .expect("serializes")
            .pointer(pointer)
            .cloned(),
    };
    value.filter(|v| !v.is_null())
}

/// JSON pointers of `value`'s leaves, with list indices; lists of scalars are leaves.
fn leaf_pointers(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) if !prefix.ends_with("/config") => {
            for (key, child) in map {
                leaf_pointers(child, &format!("{prefix}/{key}"), out);
            }
        }
        Value::Array(items) if items.iter().any(Value::is_object) => {
            for (i, item) in items.iter().enumerate() {
                leaf_pointers(item, &format!("{prefix}/{i}"), out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

fn committed_files() -> [(&'static str, &'static str); 2] {
    [
        ("caremsg.toml", EMBEDDED_DEFAULT),
        ("caremsg.production.toml", PRODUCTION),
    ]
}

#[test]
fn committed_files_parse_strictly_and_validate() {
    for (name, text) in committed_files() {
        from_toml_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        from_toml_str(&uncomment(text))
            .unwrap_or_else(|e| panic!("{name} with its commented settings set: {e}"));
    }
}

#[test]
fn production_example_lists_every_field() {
    let mut wanted = BTreeSet::new();
    let full = serde_json::to_value(full_settings()).expect("serializes");
    key_paths(&full, "", &mut wanted);
    let mut listed = BTreeSet::new();
    key_paths(&toml_as_json(&uncomment(PRODUCTION)), "", &mut listed);
    let missing: Vec<_> = wanted.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "caremsg.production.toml does not mention {missing:?}; add each, set or as \
         a commented `# key = default` line with its doc"
    );
    // The walk itself is not vacuous.
    assert!(wanted.contains("gateways.auto_answers_per_sender.burst"));
    assert!(wanted.contains("sms_auth.templates.opted_out"));
    assert!(wanted.contains("gateways.config"));
}

/// Fields whose commented-out value in `text` differs from the code's default.
fn commented_values_off_default(name: &str, text: &str) -> Vec<String> {
    let as_written = settings_json(text, name);
    let uncommented = settings_json(&uncomment(text), name);
    let mut pointers = Vec::new();
    leaf_pointers(&uncommented, "", &mut pointers);
    pointers
        .into_iter()
        .filter(|pointer| {
            // Equal: the line was set already, or its commented value is the default
            // that applied anyway. Different: a commented line shows another value,
            // which is only fine for a field without a default (an optional rate
            // limit shown as an example).
            let value = uncommented.pointer(pointer);
            value != as_written.pointer(pointer)
                && default_at(pointer).is_some_and(|default| value != Some(&default))
        })
        .collect()
}

#[test]
fn commented_values_are_the_defaults() {
    for (name, text) in committed_files() {
        let off = commented_values_off_default(name, text);
        assert!(
            off.is_empty(),
            "{name}: the commented values of {off:?} are not the defaults"
        );
    }
    // The check notices a stale default.
    let stale = PRODUCTION.replace("# max_connections = 8", "# max_connections = 9");
    assert_eq!(
        commented_values_off_default("stale", &stale),
        ["/database/max_connections"]
    );
}

/// One field's documentation in `settings.rs`.
struct FieldDoc {
    strukt: String,
    field: String,
    doc: String,
}

/// Reads the `pub` fields of `pub struct`s in a source text with their `///` lines.
fn field_docs(source: &str) -> Vec<FieldDoc> {
    let mut out = Vec::new();
    let mut strukt: Option<String> = None;
    let mut doc = Vec::new();
    for line in source.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("pub struct ") {
            let name = rest.split([' ', '{', '(', ';']).next().unwrap_or_default();
            strukt = line.ends_with('{').then(|| name.to_owned());
            doc.clear();
        } else if line == "}" {
            strukt = None;
        } else if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_owned());
        } else if line.starts_with("#[") {
            // Attributes sit between a field's doc and the field.
        } else if let (Some(s), Some(rest)) = (&strukt, line.strip_prefix("pub ")) {
            if let Some((field, _)) = rest.split_once(':') {
                out.push(FieldDoc {
                    strukt: s.clone(),
                    field: field.trim().to_owned(),
                    doc: doc.join(" "),
                });
            }
            doc.clear();
        } else {
            doc.clear();
        }
    }
    out
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn every_settings_field_documents_default_and_reloadability() {
    let mut structs = BTreeSet::new();
    let mut undocumented = Vec::new();
    let entries = std::fs::read_dir(src_dir()).expect("src dir");
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("readable source");
        // The settings structs are the ones deriving Deserialize with unknown fields
        // denied; other files hold error and result types.
        if !source.contains("deny_unknown_fields") {
            continue;
        }
        for f in field_docs(&source) {
            structs.insert(f.strukt.clone());
            if !(f.doc.contains("Default") && f.doc.contains("Reloadable")) {
                undocumented.push(format!("{}.{}", f.strukt, f.field));
            }
        }
    }
    assert!(
        undocumented.is_empty(),
        "these fields lack \"Default: ...\" or \"Reloadable: ...\" in their doc: {undocumented:?}"
    );
    assert!(structs.len() >= 12, "found only {structs:?}");
}

/// Where each settings struct sits in `full_settings()`, as JSON pointers.
const STRUCT_POINTERS: &[(&str, &[&str])] = &[
    ("Settings", &[""]),
    ("Server", &["/server"]),
    ("Database", &["/database"]),
    ("Log", &["/log"]),
    ("ApiClient", &["/clients/0"]),
    ("Writer", &["/writer"]),
    ("Conversations", &["/conversations"]),
    ("Retention", &["/retention"]),
    ("SmsAuth", &["/sms_auth"]),
    ("SmsTemplates", &["/sms_auth/templates"]),
    ("Notifications", &["/notifications"]),
    ("Events", &["/events"]),
    ("Gateway", &["/gateways/0"]),
    ("Ha", &["/ha"]),
    (
        "RateLimit",
        &[
            "/gateways/0/rate_limit",
            "/gateways/0/per_recipient",
            "/gateways/0/auto_answers_per_sender",
        ],
    ),
];

/// `value` changed to something else of a type the field accepts.
fn mutated(full: &Value, pointer: &str) -> Settings {
    let original = full.pointer(pointer).expect("pointer exists").clone();
    let candidates: Vec<Value> = match &original {
        Value::Number(n) => match n.as_u64() {
            Some(u) => vec![json!(u + 1)],
            None => vec![json!(n.as_f64().unwrap_or(0.0) + 1.0)],
        },
        Value::String(s) => [
            format!("{s}x"),
            "127.0.0.1:1".to_owned(),
            "77s".to_owned(),
            "json".to_owned(),
            "sms".to_owned(),
            "single".to_owned(),
        ]
        .into_iter()
        .map(Value::String)
        .collect(),
        Value::Bool(b) => vec![json!(!b)],
        Value::Array(items) => {
            let mut longer = items.clone();
            longer.extend(items.first().cloned());
            vec![Value::Array(longer)]
        }
        Value::Object(map) => {
            let mut bigger = map.clone();
            bigger.insert("mutated".to_owned(), json!(true));
            // A free-form table grows a key; an optional table becomes absent.
            vec![Value::Object(bigger), Value::Null]
        }
        other => panic!("{pointer}: no mutation for {other}"),
    };
    for candidate in candidates {
        let mut changed = full.clone();
        *changed.pointer_mut(pointer).expect("pointer exists") = candidate;
        if let Ok(settings) = serde_json::from_value::<Settings>(changed)
            && serde_json::to_value(&settings).ok().as_ref() != Some(full)
        {
            return settings;
        }
    }
    panic!("{pointer}: found no other valid value for {original}");
}

#[test]
fn documented_reloadability_matches_reload_plan() {
    let source = std::fs::read_to_string(src_dir().join("settings.rs")).expect("settings.rs");
    let pointers: BTreeMap<&str, &[&str]> = STRUCT_POINTERS.iter().copied().collect();
    let full_settings = full_settings();
    let full = serde_json::to_value(&full_settings).expect("serializes");
    let mut checked = 0;
    for f in field_docs(&source) {
        let prefixes = pointers
            .get(f.strukt.as_str())
            .unwrap_or_else(|| panic!("add {} to STRUCT_POINTERS", f.strukt));
        let Some((_, after)) = f.doc.split_once("Reloadable:") else {
            continue; // Reported by the documentation test.
        };
        let reloadable = match after.split_whitespace().next() {
            Some("yes.") | Some("yes") => true,
            Some("no.") | Some("no") => false,
            _ => continue, // "per field": the fields below say.
        };
        for prefix in *prefixes {
            let pointer = format!("{prefix}/{}", f.field);
            let new = mutated(&full, &pointer);
            match (reload_plan(&full_settings, &new), reloadable) {
                (Ok(changed), true) => assert!(!changed.is_empty(), "{pointer}: no change seen"),
                (Err(refused), false) => assert!(
                    pointer
                        .trim_start_matches('/')
                        .replace('/', ".")
                        .starts_with(&refused.field.replace("[0]", ".0")),
                    "{pointer}: refused as {}",
                    refused.field
                ),
                (result, _) => panic!(
                    "{}.{} is documented \"Reloadable: {}\" but reload_plan gives {result:?}",
                    f.strukt,
                    f.field,
                    if reloadable { "yes" } else { "no" }
                ),
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} fields checked");
}
