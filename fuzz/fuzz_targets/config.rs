//! Feeds arbitrary text to the configuration parser (`hexa_shared::config::parse`, what `load` does
//! with a file's text) as the agent's and as the coordinator's configuration file, then checks what
//! each binary checks before it starts. Holds:
//! - nothing panics or allocates past the cap;
//! - every refusal names the file;
//! - a configuration that loads survives a round trip: written back as TOML and parsed again, it is
//!   the same configuration.
#![no_main]

use hexa_agent::config::AgentConfig;
use hexa_coordinator::config::CoordinatorConfig;
use hexa_shared::config::{ConfigError, parse};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

const FILE: &str = "fuzz.toml";

fn load<T: Serialize + DeserializeOwned + Default + PartialEq + std::fmt::Debug>(text: &str) -> Option<T> {
    match parse::<T>(text, FILE, []) {
        Ok(config) => {
            let written = toml::to_string(&config).expect("a loaded configuration serialises");
            let again: T = parse(&written, FILE, []).expect("a written configuration loads");
            assert_eq!(again, config, "round trip changed the configuration:\n{written}");
            Some(config)
        }
        Err(ConfigError::Invalid(message)) => panic!("the defaults do not serialise: {message}"),
        Err(refused) => {
            assert!(refused.to_string().contains(FILE), "{refused}");
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(mut agent) = load::<AgentConfig>(text) {
        // The token file is read as it is named; reading whatever path the input names is not
        // parsing, so the check runs without one (a token in the file itself is still checked).
        agent.token_file = Default::default();
        let _ = agent.check(FILE);
    }
    if let Some(coordinator) = load::<CoordinatorConfig>(text) {
        let _ = coordinator.validate();
    }
});
