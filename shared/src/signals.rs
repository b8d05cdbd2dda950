//! Process signals both daemons stop on.

/// A termination signal handler could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the {signal} handler: {error}")]
pub struct SignalError {
    pub signal: &'static str,
    pub error: std::io::Error,
}

/// Waits until the process is asked to stop: SIGINT (Ctrl-C) or SIGTERM (what systemd sends).
pub async fn wait_for_termination() -> Result<(), SignalError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|error| SignalError { signal: "SIGTERM", error })?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(|error| SignalError { signal: "SIGINT", error })?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::signal::unix::{SignalKind, signal};

    #[tokio::test]
    async fn sigterm_ends_the_wait() {
        // Installed before anything is sent, so a SIGTERM never takes the test process down; tokio
        // keeps the handler for the life of the process.
        let _keep = signal(SignalKind::terminate()).unwrap();
        let mut waiting = tokio::spawn(wait_for_termination());
        for _ in 0..100 {
            let sent =
                std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status().unwrap();
            assert!(sent.success());
            // The wait may not have installed its own handler yet: send again until it returns.
            if let Ok(outcome) = tokio::time::timeout(Duration::from_millis(100), &mut waiting).await {
                assert!(matches!(outcome, Ok(Ok(()))), "{outcome:?}");
                return;
            }
        }
        panic!("SIGTERM did not end wait_for_termination");
    }
}
