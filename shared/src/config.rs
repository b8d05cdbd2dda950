//! Configuration files: TOML, every key optional (defaults come from the type's `Default`), unknown
//! keys refused, and every key overridable from the environment as `HEXA_<KEY>` (upper case; keys
//! of a `[section]` as `HEXA_<SECTION>_<KEY>`). Command-line flags, applied by the caller, win over
//! both.
//!
//! The packaged files (`packaging/agent.toml`, `packaging/coordinator.toml`) are held to the
//! types' defaults by tests beside the types (`hexa_agent::config`, `hexa_coordinator::config`):
//! loaded, each file must equal `Default::default()`, and every key must have a comment above it.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a configuration file is refused: the file, the key, what is wrong with it and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The io error's text is part of the message and not repeated as a source.
    #[error("config file {path}: cannot read it ({error}); check the path and that the service may read it")]
    Read { path: String, error: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config file {path}{}: unknown key `{key}` ({problem}); remove it or correct its name", at_line(*line))]
    UnknownKey { path: String, key: String, line: Option<usize>, problem: String },
    #[error(
        "config file {path}{}: key `{key}`: {problem}; write a value of the type the key takes (the packaged \
         file shows each key with its default)",
        at_line(*line)
    )]
    BadValue { path: String, key: String, line: Option<usize>, problem: String },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}={value:?}: {message}")]
    Env { var: String, value: String, message: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

fn at_line(line: Option<usize>) -> String {
    line.map(|n| format!(" line {n}")).unwrap_or_default()
}

/// Turns a deserialization error into one that names the key (`section.key`) and its line.
fn refusal(path: &str, text: &str, error: &toml::de::Error) -> ConfigError {
    let shown = error.to_string();
    let problem = error.message().trim().to_string();
    // toml names where the error is as a last line "in `section.key`".
    let at = shown.lines().rev().find_map(|l| l.trim().strip_prefix("in `")?.strip_suffix('`')).map(str::to_string);
    let unknown = problem
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field.to_string());
    match (unknown, at) {
        (Some(field), section) => {
            let key = section.map_or_else(|| field.clone(), |s| format!("{s}.{field}"));
            ConfigError::UnknownKey { path: path.into(), line: key_line(text, &key), key, problem }
        }
        (None, Some(key)) => ConfigError::BadValue { path: path.into(), line: key_line(text, &key), key, problem },
        (None, None) => ConfigError::Parse { path: path.into(), message: problem },
    }
}

/// The line (1-based) where `key` (`section.key` or `key`) is set in `text`, if it is.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let (section, leaf) = key.rsplit_once('.').unwrap_or(("", key));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header.trim_start_matches('[').trim_end_matches(']').trim().to_string();
            continue;
        }
        let set = line.strip_prefix(leaf).is_some_and(|rest| rest.trim_start().starts_with('='));
        if current == section && set {
            return Some(i + 1);
        }
    }
    None
}

/// Loads `T` from `path` (or `default_path` when none is given; a missing default file means all
/// defaults), then applies `HEXA_*` overrides from `env`.
pub fn load<T>(
    path: Option<&Path>,
    default_path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let (file_path, must_exist) = match path {
        Some(p) => (p, true),
        None => (default_path, false),
    };
    let display = file_path.display().to_string();
    let text = match std::fs::read_to_string(file_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => String::new(),
        Err(error) => return Err(ConfigError::Read { path: display, error }),
    };
    parse(&text, &display, env)
}

/// What [`load`] does once it has read the file: `text` (the file named `display` in errors)
/// parsed, `HEXA_*` overrides from `env` applied, the result checked against `T`.
pub fn parse<T>(text: &str, display: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let defaults = toml::Table::try_from(T::default()).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let mut table = text
        .parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax { path: display.to_string(), message: e.to_string().trim().to_string() })?;
    let overrides: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with("HEXA_")).collect();
    apply_env(&defaults, &mut table, &[], &overrides)?;
    toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| refusal(display, text, &e))
}

fn apply_env(
    defaults: &toml::Table,
    table: &mut toml::Table,
    prefix: &[&str],
    env: &[(String, String)],
) -> Result<(), ConfigError> {
    for (key, default) in defaults {
        let mut path = prefix.to_vec();
        path.push(key);
        if let toml::Value::Table(section) = default {
            // Only a variable that sets something creates the section: an empty one inserted here
            // would mean "given, with every key missing", which is not what the file said.
            let mut sub = match table.get(key) {
                Some(toml::Value::Table(existing)) => existing.clone(),
                _ => toml::Table::new(),
            };
            let before = sub.clone();
            apply_env(section, &mut sub, &path, env)?;
            if sub != before {
                table.insert(key.clone(), toml::Value::Table(sub));
            }
            continue;
        }
        let var = format!("HEXA_{}", path.join("_").to_ascii_uppercase());
        let Some((_, raw)) = env.iter().find(|(k, _)| *k == var) else { continue };
        let err = |message: &str| ConfigError::Env { var: var.clone(), value: raw.clone(), message: message.into() };
        let value = match default {
            toml::Value::Integer(_) => {
                toml::Value::Integer(raw.trim().parse().map_err(|_| err("expected an integer"))?)
            }
            toml::Value::Float(_) => toml::Value::Float(raw.trim().parse().map_err(|_| err("expected a number"))?),
            toml::Value::Boolean(_) => {
                toml::Value::Boolean(raw.trim().parse().map_err(|_| err("expected true or false"))?)
            }
            toml::Value::Array(_) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.into()))
                    .collect(),
            ),
            _ => toml::Value::String(raw.clone()),
        };
        table.insert(key.clone(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Duration;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        name: String,
        port: u16,
        #[serde(with = "humantime_serde")]
        interval: Duration,
        enabled: bool,
        names: Vec<String>,
        limits: Limits,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Limits {
        memory: u64,
    }

    impl Default for Limits {
        fn default() -> Self {
            Limits { memory: 5 }
        }
    }

    impl Default for Sample {
        fn default() -> Self {
            Sample {
                name: "a".into(),
                port: 1,
                interval: Duration::from_secs(1),
                enabled: false,
                names: vec![],
                limits: Limits::default(),
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "port = 7\ninterval = \"2s\"\n[limits]\nmemory = 9\n").unwrap();
        let loaded: Sample = load(Some(&file), Path::new("/none"), env(&[])).unwrap();
        assert_eq!(
            (loaded.port, loaded.interval, loaded.limits.memory, loaded.name.as_str()),
            (7, Duration::from_secs(2), 9, "a")
        );

        let loaded: Sample = load(
            Some(&file),
            Path::new("/none"),
            env(&[
                ("HEXA_PORT", "8"),
                ("HEXA_INTERVAL", "5s"),
                ("HEXA_ENABLED", "true"),
                ("HEXA_NAMES", "x, y"),
                ("HEXA_LIMITS_MEMORY", "11"),
                ("OTHER", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(loaded.port, 8);
        assert_eq!(loaded.interval, Duration::from_secs(5));
        assert!(loaded.enabled);
        assert_eq!(loaded.names, vec!["x", "y"]);
        assert_eq!(loaded.limits.memory, 11);
    }

    #[test]
    fn a_missing_default_file_means_defaults_but_a_named_one_is_an_error() {
        let loaded: Sample = load(None, Path::new("/nonexistent/c.toml"), env(&[])).unwrap();
        assert_eq!(loaded, Sample::default());
        let err = load::<Sample>(Some(Path::new("/nonexistent/c.toml")), Path::new("/x"), env(&[])).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/c.toml"), "{err}");
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Outer {
        inner: Inner,
    }

    impl Default for Outer {
        fn default() -> Self {
            Outer { inner: Inner { a: 1, b: 2 } }
        }
    }

    /// A table whose keys are all required once the table is given.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        a: u32,
        b: u32,
    }

    #[test]
    fn sections_not_mentioned_anywhere_keep_their_defaults() {
        let loaded: Outer = load(None, Path::new("/nonexistent"), env(&[])).unwrap();
        assert_eq!(loaded, Outer::default());
        // A section the environment half-fills is refused, as a half-filled one in a file is.
        let err = load::<Outer>(None, Path::new("/nonexistent"), env(&[("HEXA_INNER_A", "5")])).unwrap_err();
        assert!(err.to_string().contains("missing field `b`"), "{err}");
    }

    #[test]
    fn a_refusal_names_the_file_the_key_its_line_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let shown = file.display().to_string();
        let cases = [
            (
                "port = 7\n[limits]\nmemroy = 9\n",
                format!(
                    "config file {shown} line 3: unknown key `limits.memroy` (unknown field `memroy`, expected `memory`); remove it or correct its name"
                ),
            ),
            ("prot = 7\n", format!("config file {shown} line 1: unknown key `prot` (unknown field `prot`")),
            (
                "name = \"x\"\nport = \"seven\"\n",
                format!(
                    "config file {shown} line 2: key `port`: invalid type: string \"seven\", expected u16; write a value of the type the key takes"
                ),
            ),
            ("[limits]\nmemory = -1\n", format!("config file {shown} line 2: key `limits.memory`: invalid value")),
            ("port = \n", format!("config file {shown} is not valid TOML: TOML parse error at line 1")),
        ];
        for (text, expected) in cases {
            std::fs::write(&file, text).unwrap();
            let err = load::<Sample>(Some(&file), Path::new("/x"), env(&[])).unwrap_err().to_string();
            assert!(err.starts_with(&expected), "{text:?}:\n got {err}\nwant {expected}");
        }
        let err = load::<Sample>(Some(&dir.path().join("none.toml")), Path::new("/x"), env(&[])).unwrap_err();
        assert!(err.to_string().contains("none.toml: cannot read it ("), "{err}");
    }

    #[test]
    fn mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "prot = 7\n").unwrap();
        let err = load::<Sample>(Some(&file), Path::new("/x"), env(&[])).unwrap_err().to_string();
        assert!(err.contains("prot"), "{err}");
        let err = load::<Sample>(None, Path::new("/x"), env(&[("HEXA_PORT", "seven")])).unwrap_err().to_string();
        assert!(err.contains("HEXA_PORT") && err.contains("integer"), "{err}");
        let err = load::<Sample>(None, Path::new("/x"), env(&[("HEXA_INTERVAL", "soon")])).unwrap_err().to_string();
        assert!(err.contains("interval"), "{err}");
    }
}
