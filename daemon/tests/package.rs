//! What an operator installs: the Debian package's contents (built with `cargo deb`
//! when `CAREMSG_PACKAGE_TEST=1`, which CI sets), and the operator's guide that ships
//! in it, kept true to the code — its configuration reference is generated from
//! `config/caremsg.production.toml`, and its metrics table lists exactly what
//! `/metrics` exports.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

const GUIDE: &str = "docs/operations.md";
const BEGIN: &str = "<!-- BEGIN configuration reference (generated; do not edit by hand) -->";
const END: &str = "<!-- END configuration reference -->";

// ---------------------------------------------------------------------------------
// The configuration reference, generated from the production example's comments.

/// One setting as the production example documents it.
#[derive(Debug)]
struct Setting {
    /// Dotted path under its table, e.g. `listen`, `templates.confirmed`.
    key: String,
    /// The comment lines above it, joined.
    doc: String,
    /// The value written (or commented out) in the example.
    value: String,
}

/// A table of the example, with the comment above its header.
#[derive(Debug)]
struct Section {
    /// `""` for top-level settings, else e.g. `server`, `[clients]`.
    header: String,
    doc: String,
    settings: Vec<Setting>,
}

/// `key = value` or `# key = value` (a setting left at its default).
fn setting_line(line: &str) -> Option<(&str, &str)> {
    let line = line.strip_prefix("# ").unwrap_or(line);
    let (key, value) = line.split_once(" = ")?;
    let is_key = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    is_key.then_some((key, value))
}

fn parse_example(text: &str) -> Vec<Section> {
    let mut sections = vec![Section {
        header: String::new(),
        doc: String::new(),
        settings: Vec::new(),
    }];
    let mut seen = BTreeSet::new();
    // The comment block being read, and the last one a blank line closed (the
    // description of a table is sometimes separated from its header by a blank line).
    let mut block: Vec<String> = Vec::new();
    let mut closed: Vec<String> = Vec::new();
    // Inside `[gateways.config]`: the plugin's own keys, not ours.
    let mut opaque = false;
    for line in text.lines().map(str::trim_end) {
        if line.is_empty() {
            if !block.is_empty() {
                closed = std::mem::take(&mut block);
            }
            continue;
        }
        if line.starts_with("# ---") {
            block.clear();
            closed.clear();
            continue;
        }
        if line.starts_with('[') {
            // `[[clients]]` keeps one pair of brackets: a list of tables.
            let header = if line.starts_with("[[") {
                line[1..line.len() - 1].to_owned()
            } else {
                line.trim_matches(['[', ']']).to_owned()
            };
            let doc = if block.is_empty() { &closed } else { &block }.join(" ");
            if header == "gateways.config" {
                // The plugin's settings: one entry for the whole table.
                opaque = true;
                if seen.insert("gateways.config".to_owned()) {
                    let section = sections.last_mut().unwrap();
                    section.settings.push(Setting {
                        key: "config".to_owned(),
                        doc,
                        value: "{}".to_owned(),
                    });
                }
            } else {
                opaque = false;
                if seen.insert(format!("[{header}]")) {
                    sections.push(Section {
                        header,
                        doc,
                        settings: Vec::new(),
                    });
                }
            }
            block.clear();
            closed.clear();
            continue;
        }
        if let Some((key, value)) = setting_line(line) {
            let section = sections.last_mut().unwrap();
            let path = format!("{}.{key}", section.header.trim_start_matches('['));
            if !opaque && seen.insert(path) && !block.is_empty() {
                section.settings.push(Setting {
                    key: key.to_owned(),
                    doc: block.join(" "),
                    value: value.to_owned(),
                });
            }
            block.clear();
            closed.clear();
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            block.push(comment.trim().to_owned());
        } else {
            panic!("unexpected line in the production example: {line:?}");
        }
    }
    // The top of the file is the file's own introduction, not a table's.
    sections[0].doc.clear();
    sections.retain(|s| !s.settings.is_empty() || !s.doc.is_empty());
    sections
}

/// Splits "What it is. Default: X. Reloadable: yes." into its three parts.
fn split_doc(doc: &str) -> (String, String, String) {
    let (text, rest) = doc.split_once("Default: ").unwrap_or((doc, ""));
    let (default, reload) = rest.split_once("Reloadable: ").unwrap_or((rest, ""));
    let default = default.trim().trim_end_matches('.').to_owned();
    let reload = reload.trim().trim_end_matches('.').to_owned();
    (text.trim().to_owned(), default, reload)
}

/// Markdown for prose from the example: `<...>` outside code spans would vanish as
/// HTML, and `|` would end a table cell.
fn prose(text: &str) -> String {
    text.split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                part.to_owned()
            } else {
                part.replace('<', "&lt;").replace('>', "&gt;")
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}

fn cell(text: &str) -> String {
    prose(text).replace('|', "\\|")
}

/// A default as the example writes it: literal values in code, words as words.
fn default_cell(default: &str, value: &str) -> String {
    if default == "as below" {
        return format!("`{}`", cell(value));
    }
    let literal = default
        .chars()
        .next()
        .is_some_and(|c| c == '"' || c == '[' || c == '{' || c.is_ascii_digit());
    if !literal {
        return cell(default);
    }
    match default.split_once(" (") {
        Some((value, note)) => format!("`{}` ({}", cell(value), cell(note)),
        None => format!("`{}`", cell(default)),
    }
}

fn reference(sections: &[Section]) -> String {
    let mut out = String::new();
    for section in sections {
        let title = match section.header.as_str() {
            "" => "Top level".to_owned(),
            h if h.starts_with('[') => format!("`[{h}]` (a list: repeat the table)"),
            h => format!("`[{h}]`"),
        };
        out.push_str(&format!("\n### {title}\n\n"));
        if !section.doc.is_empty() {
            out.push_str(&prose(&section.doc));
            out.push_str("\n\n");
        }
        if section.settings.is_empty() {
            continue;
        }
        out.push_str("| Setting | Default | Reloadable | What it is |\n");
        out.push_str("|---------|---------|------------|------------|\n");
        let mut previous = String::new();
        for setting in &section.settings {
            let (mut text, default, reload) = split_doc(&setting.doc);
            // A setting documented together with the one above it.
            if text.is_empty() {
                text = format!("See `{previous}`.");
            }
            previous.clone_from(&setting.key);
            out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                setting.key,
                default_cell(&default, &setting.value),
                cell(&reload),
                cell(&text)
            ));
        }
    }
    out
}

#[test]
fn the_guide_s_configuration_reference_is_generated_from_the_production_example() {
    let sections = parse_example(&read("config/caremsg.production.toml"));
    let expected = reference(&sections);
    // Sanity: the generator found the settings an operator most needs.
    for needle in [
        "| `state_dir` |",
        "| `listen` |",
        "| `url` |",
        "| `token_sha256` |",
        "| `confirmed` |",
        "| `rate_limit` |",
        "| `config` |",
    ] {
        assert!(
            expected.contains(needle),
            "{needle} missing from:\n{expected}"
        );
    }
    let guide = read(GUIDE);
    let (head, rest) = guide.split_once(BEGIN).expect("the BEGIN marker");
    let (current, tail) = rest.split_once(END).expect("the END marker");
    if current != expected {
        if std::env::var_os("CAREMSG_UPDATE_DOCS").is_some() {
            std::fs::write(
                root().join(GUIDE),
                format!("{head}{BEGIN}{expected}{END}{tail}"),
            )
            .unwrap();
        } else {
            panic!(
                "{GUIDE}'s configuration reference is out of date with \
                 config/caremsg.production.toml; regenerate it with \
                 `CAREMSG_UPDATE_DOCS=1 cargo test -p caremsgd --test package`"
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// The metrics table.

/// Every metric registered in `daemon/src/metrics.rs`, with the prefix: the first
/// string literal after each `.register(`. (The registry itself cannot list them:
/// a labelled family is not rendered until it has a first label set.)
fn registered_metrics() -> BTreeSet<String> {
    read("daemon/src/metrics.rs")
        .split(".register(")
        .skip(1)
        .filter_map(|call| call.split('"').nth(1))
        .map(|name| format!("caremsg_{name}"))
        .collect()
}

/// A name as the guide may write it (`_total`, `_bucket`, ... and PromQL selectors
/// included), reduced to the registered name.
fn base_name(name: &str) -> &str {
    let name = name.split(['{', '[', '(', ' ']).next().unwrap_or(name);
    ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

#[test]
fn the_guide_documents_exactly_the_metrics_the_daemon_exports() {
    let registered = registered_metrics();
    assert!(
        registered.contains("caremsg_writer_commit_seconds"),
        "{registered:?}"
    );
    let guide = read(GUIDE);
    let code: Vec<&str> = guide.split('`').skip(1).step_by(2).collect();
    let documented: BTreeSet<&str> = code
        .iter()
        .filter(|c| c.starts_with("caremsg_") && c.len() > "caremsg_".len())
        .map(|c| base_name(c))
        .collect();
    let undocumented: Vec<_> = registered
        .iter()
        .filter(|name| !documented.contains(name.as_str()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "metrics registered in daemon/src/metrics.rs but missing from {GUIDE}'s \
         Metrics table: {undocumented:?}"
    );
    let unknown: Vec<_> = documented
        .iter()
        .filter(|name| !registered.contains(**name))
        .collect();
    assert!(
        unknown.is_empty(),
        "{GUIDE} names metrics the daemon does not register: {unknown:?}"
    );
    // Scraped names: counters end in `_total`; the guide's table uses scraped names.
    let rendered = caremsgd::metrics::Metrics::new().render();
    for line in rendered.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut words = line.split_whitespace();
        let (name, kind) = (words.next().unwrap(), words.next().unwrap());
        let scraped = match kind {
            "counter" => format!("{name}_total"),
            _ => name.to_owned(),
        };
        assert!(
            guide.contains(&format!("| `{scraped}` | {kind} |")),
            "{GUIDE}'s Metrics table should have a row `| `{scraped}` | {kind} |`"
        );
    }
}

// ---------------------------------------------------------------------------------
// The package.

/// Paths the package must contain, with their modes.
const EXPECTED: &[(&str, &str)] = &[
    ("./usr/bin/caremsgd", "-rwxr-xr-x"),
    (
        "./usr/lib/caremsg/plugins/libcaremsg_sms_twilio.so",
        "-rw-r--r--",
    ),
    (
        "./usr/lib/caremsg/plugins/libcaremsg_email_smtp.so",
        "-rw-r--r--",
    ),
    (
        "./usr/lib/caremsg/plugins/libcaremsg_portal_webhook.so",
        "-rw-r--r--",
    ),
    (
        "./usr/lib/caremsg/plugins/libcaremsg_sms_telnyx.so",
        "-rw-r--r--",
    ),
    ("./etc/caremsg/caremsg.toml", "-rw-r-----"),
    ("./usr/lib/systemd/system/caremsgd.service", "-rw-r--r--"),
    ("./usr/lib/sysusers.d/caremsgd.conf", "-rw-r--r--"),
    ("./usr/lib/tmpfiles.d/caremsgd.conf", "-rw-r--r--"),
    ("./usr/share/doc/caremsgd/operations.md", "-rw-r--r--"),
    ("./usr/share/doc/caremsgd/README.md", "-rw-r--r--"),
    ("./usr/share/doc/caremsgd/copyright", "-rw-r--r--"),
];

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_debian_package_builds_and_holds_what_an_operator_installs() {
    if std::env::var("CAREMSG_PACKAGE_TEST").as_deref() != Ok("1") {
        println!(
            "note: the Debian package was not built; set CAREMSG_PACKAGE_TEST=1 to build it \
             with `cargo deb` (a release build: minutes) and check its contents"
        );
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let built = run(Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["deb", "-p", "caremsgd", "--output"])
        .arg(out_dir.path()));
    let deb = built
        .lines()
        .map(str::trim)
        .find(|line| line.ends_with(".deb"))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("cargo deb printed no .deb path: {built}"));
    assert!(deb.exists(), "{}", deb.display());

    // Contents: path and mode of every file (`dpkg-deb -c` lines: mode, owner, size,
    // date, time, path).
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let files: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((*fields.get(5)?, *fields.first()?))
        })
        .collect();
    for (path, mode) in EXPECTED {
        let found = files.iter().find(|(p, _)| p == path);
        assert_eq!(
            found.map(|(_, m)| *m),
            Some(*mode),
            "{path} in the package:\n{listing}"
        );
    }
    for (path, _) in &files {
        assert!(!path.contains("/target/"), "a build path leaked: {path}");
    }

    // The configuration is a conffile; the postinst creates the user and applies the
    // tmpfiles; nothing starts the service on first install.
    let control = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(control.path()));
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert!(
        conffiles.lines().any(|l| l == "/etc/caremsg/caremsg.toml"),
        "{conffiles}"
    );
    let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap();
    assert!(
        postinst.contains("systemd-sysusers") && postinst.contains("caremsgd.conf"),
        "{postinst}"
    );
    assert!(postinst.contains("systemd-tmpfiles --create"), "{postinst}");
    assert!(
        !postinst.contains("deb-systemd-invoke start"),
        "the service must not start before its secrets are set:\n{postinst}"
    );

    // The packaged files are the repository's.
    let unpacked = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(unpacked.path()));
    for (packaged, source) in [
        ("etc/caremsg/caremsg.toml", "config/caremsg.production.toml"),
        (
            "usr/lib/systemd/system/caremsgd.service",
            "systemd/caremsgd.service",
        ),
        (
            "usr/lib/sysusers.d/caremsgd.conf",
            "systemd/caremsgd.sysusers",
        ),
        (
            "usr/lib/tmpfiles.d/caremsgd.conf",
            "systemd/caremsgd.tmpfiles",
        ),
    ] {
        let packaged = std::fs::read_to_string(unpacked.path().join(packaged)).unwrap();
        assert_eq!(packaged, read(source), "{source}");
    }
    // Every plugin library the packaged configuration names is in the package.
    let packaged_config = read("config/caremsg.production.toml");
    let libraries: Vec<&str> = packaged_config
        .lines()
        .filter_map(|l| l.strip_prefix("library = \"")?.strip_suffix('"'))
        .collect();
    assert!(!libraries.is_empty(), "the example names no plugin library");
    for library in libraries {
        assert!(
            files
                .iter()
                .any(|(p, _)| p.strip_prefix('.') == Some(library)),
            "{library} is configured but not packaged:\n{listing}"
        );
    }
    // The packaged binary runs and accepts the packaged configuration.
    let check = Command::new(unpacked.path().join("usr/bin/caremsgd"))
        .arg("check-config")
        .arg(unpacked.path().join("etc/caremsg/caremsg.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// The loopback SMS gateway is for development (issue 14, item 13): the production
/// example does not configure it, the package does not ship it, and the example draws
/// no configuration warning.
#[test]
fn production_leaves_the_loopback_gateway_out() {
    let example = read("config/caremsg.production.toml");
    assert!(
        !example.contains("sms_loopback"),
        "the production example names the loopback gateway"
    );
    let settings = caremsg_config::from_toml_str(&example).unwrap();
    assert!(settings.warnings().is_empty(), "{:?}", settings.warnings());
    let manifest = read("daemon/Cargo.toml");
    let assets = manifest
        .split("[package.metadata.deb]")
        .nth(1)
        .expect("the package metadata");
    assert!(
        !assets.contains("libcaremsg_sms_loopback.so"),
        "the package ships the loopback gateway"
    );
    assert!(
        assets.contains("libcaremsg_sms_telnyx.so"),
        "the package ships the Telnyx gateway"
    );
    assert!(
        EXPECTED
            .iter()
            .all(|(path, _)| !path.contains("sms_loopback"))
    );
}
