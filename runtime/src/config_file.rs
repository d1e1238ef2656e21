//! `--config FILE`: a TOML file of options for a server, with the same names
//! as its flags (`prepare-timeout-ms = 1500` or `prepare_timeout_ms = 1500`).
//!
//! Precedence, highest first: a flag on the command line, its environment
//! variable (`DECREE_PREPARE_TIMEOUT_MS`), the file, the default. The file is
//! applied by turning each of its keys that the command line and the
//! environment leave unset into a flag, before the flags are parsed, so every
//! value goes through the same validation and an unknown key is refused like
//! an unknown flag (exit 2, naming it).

use std::ffi::OsString;

/// Where the options start in `args` (after the program and any subcommand),
/// and the file named by `--config PATH`, `--config=PATH` or `DECREE_CONFIG`:
/// returns `args` with the file's options inserted at `at`.
pub fn apply(args: Vec<OsString>, at: usize) -> Result<Vec<OsString>, String> {
    let strings: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let from_flag = strings.iter().enumerate().find_map(|(i, a)| {
        if a == "--config" {
            strings.get(i + 1).cloned()
        } else {
            a.strip_prefix("--config=").map(str::to_owned)
        }
    });
    let Some(path) = from_flag.or_else(|| std::env::var("DECREE_CONFIG").ok()) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("--config {path}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("--config {path}: {e}"))?;
    let mut injected: Vec<OsString> = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let given = strings.iter().any(|a| *a == format!("--{flag}") || a.starts_with(&format!("--{flag}=")));
        let env = format!("DECREE_{}", flag.replace('-', "_").to_uppercase());
        if given || std::env::var_os(&env).is_some() || flag == "config" {
            continue;
        }
        let values = match value {
            toml::Value::Array(items) => items,
            one => vec![one],
        };
        for value in values {
            match value {
                toml::Value::Boolean(true) => injected.push(format!("--{flag}").into()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => injected.extend([format!("--{flag}").into(), s.into()]),
                toml::Value::Integer(n) => {
                    injected.extend([format!("--{flag}").into(), n.to_string().into()])
                }
                toml::Value::Float(x) => injected.extend([format!("--{flag}").into(), x.to_string().into()]),
                other => {
                    return Err(format!(
                        "--config {path}: {key} = {other}: expected a string, number or boolean"
                    ))
                }
            }
        }
    }
    let at = at.min(args.len());
    let mut out = args[..at].to_vec();
    out.extend(injected);
    out.extend_from_slice(&args[at..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 500, ..Default::default() })]

        /// Whatever a configuration file holds (random text, or TOML-looking
        /// lines of random keys and values), reading it answers: options or
        /// an error naming the file, never a panic.
        #[test]
        fn any_file_is_read_or_refused_never_a_panic(
            text in "(\\PC{0,40}\n){0,6}|([a-z_-]{1,12} = (\\PC{0,12}|[0-9]{1,25}|\\[.{0,20}\\]|\\{.{0,12}\\})\n){0,6}"
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.toml");
            std::fs::write(&path, &text).unwrap();
            let path = path.display().to_string();
            if let Err(err) = apply(args(&["decree", "coordinator", "--config", &path]), 2) {
                proptest::prop_assert!(err.contains(&path), "{err}");
            }
        }
    }

    #[test]
    fn file_options_go_before_the_command_line_and_never_replace_a_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "prepare_timeout_ms = 1500\nlisten = \"127.0.0.1:9\"\ncrash-at = [\"a\", \"b\"]\nverbose = true\nquiet = false\n").unwrap();
        let path = path.display().to_string();
        let out =
            apply(args(&["decree", "coordinator", "--config", &path, "--listen", "127.0.0.1:1"]), 2).unwrap();
        let out: Vec<String> = out.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            out,
            vec![
                "decree",
                "coordinator",
                "--crash-at",
                "a",
                "--crash-at",
                "b",
                "--prepare-timeout-ms",
                "1500",
                "--verbose",
                "--config",
                &path,
                "--listen",
                "127.0.0.1:1"
            ]
        );
    }

    #[test]
    fn a_bad_file_is_an_error_naming_it() {
        let err = apply(args(&["x", "--config", "/nonexistent/decree.toml"]), 1).unwrap_err();
        assert!(err.contains("/nonexistent/decree.toml"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "this is = = not toml").unwrap();
        assert!(apply(args(&["x", &format!("--config={}", path.display())]), 1).is_err());
    }
}
