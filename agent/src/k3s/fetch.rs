//! Getting a K3s release onto the node: the checksum file and the binary, from a server with K3s'
//! release layout or from an air-gap directory, verified against the checksum before the caller
//! may install it.
//!
//! Downloads go to a file named after the expected sha256 in the agent's download directory and
//! are resumed with an HTTP `Range` request, within an attempt's retries and across applies. Every
//! network wait is bounded: connecting, waiting for the response headers, and each silence in
//! the body; a server that hangs fails the attempt instead of the agent.

use std::fs;
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use hexa_shared::k3s::ArtifactSource;

use super::paths;

/// A node architecture K3s publishes binaries for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// The architecture this agent was built for, which is the node's.
    pub fn of_this_machine() -> Result<Arch, FetchError> {
        match std::env::consts::ARCH {
            "x86_64" => Ok(Arch::Amd64),
            "aarch64" => Ok(Arch::Arm64),
            other => Err(FetchError::UnsupportedArch(other.to_string())),
        }
    }

    /// K3s' name for it, as in `sha256sum-amd64.txt`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The binary's file name in a release: `k3s` on amd64, `k3s-arm64` on arm64.
    pub fn binary_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "k3s",
            Arch::Arm64 => "k3s-arm64",
        }
    }

    /// The release's checksum file for this architecture.
    pub fn checksum_name(self) -> String {
        format!("sha256sum-{}.txt", self.name())
    }
}

/// How patient the fetcher is.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Establishing a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// From sending a request to having the response's status and headers.
    pub response_timeout: Duration,
    /// The longest silence allowed while reading a body.
    pub idle_timeout: Duration,
    /// Attempts per file, the first included.
    pub attempts: u32,
    /// The wait after the first failed attempt; it doubles after each failure, up to `backoff_max`,
    /// and is jittered between half and all of that.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often a long download logs its progress.
    pub progress_every: Duration,
    /// Refuse binaries larger than this (K3s' are about 70 MiB).
    pub max_binary_bytes: u64,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            attempts: 5,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            progress_every: Duration::from_secs(5),
            max_binary_bytes: 1 << 30,
        }
    }
}

/// Checksum files list a few dozen artifacts; anything much larger is not one.
const MAX_CHECKSUM_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unsupported architecture {0}: K3s is installed on amd64 and arm64 nodes")]
    UnsupportedArch(String),
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
    #[error(
        "{url} does not exist (HTTP 404): check that {version} is a published K3s release and that \
         the artifact base URL has K3s' release layout <base>/<version>/<file>"
    )]
    NotFound { url: String, version: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {what} within {after:?}; the server or the network hangs")]
    Timeout { url: String, what: &'static str, after: Duration },
    #[error("{url}: {message}")]
    Network { url: String, message: String },
    #[error("{url}: the transfer stopped after {received} of {expected} bytes")]
    Truncated { url: String, received: u64, expected: u64 },
    #[error("{url} is larger than the {limit}-byte limit for this file")]
    TooLarge { url: String, limit: u64 },
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp { url: String, attempts: u32, last: Box<FetchError> },
    #[error("the checksum file {listing} has no sha256 for {file}: is {file} published for this architecture?")]
    NoChecksum { listing: String, file: String },
    #[error(
        "{what} has sha256 {actual}, but the release's checksum (its checksum file, or the pin in the \
         coordinator's [k3s] sha256) says {expected}: the artifact or its mirror is wrong, so nothing was \
         installed from it"
    )]
    ChecksumMismatch { what: String, expected: String, actual: String },
    #[error("air-gap file {path} is missing: copy K3s' release file {file} for this version there")]
    AirGapMissing { path: PathBuf, file: String },
    #[error("{action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        /// Named in the message, so not also the `source`.
        error: std::io::Error,
    },
}

impl FetchError {
    /// Whether another attempt might succeed.
    fn is_transient(&self) -> bool {
        match self {
            FetchError::Timeout { .. } | FetchError::Network { .. } | FetchError::Truncated { .. } => true,
            FetchError::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FetchError + 'a {
    move |error| FetchError::Io { action, path: path.to_path_buf(), error }
}

/// The sha256 (lowercase hex) of `file` in a release's checksum listing (`<hex>  <name>` lines).
pub fn checksum_for(listing: &str, file: &str) -> Option<String> {
    listing.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (hash, name) = (fields.next()?, fields.next()?);
        let name = name.strip_prefix('*').unwrap_or(name);
        (name == file && hexa_shared::k3s::is_sha256_hex(&hash.to_ascii_lowercase())).then(|| hash.to_ascii_lowercase())
    })
}

/// sha256 of a file's contents, read off the async runtime's threads.
pub async fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = fs::File::open(&owned).map_err(io_error("open", &owned))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io_error("read", &owned))?;
            if n == 0 {
                return Ok(hex::encode(hasher.finalize()));
            }
            hasher.update(&buf[..n]);
        }
    })
    .await
    .map_err(|e| FetchError::Io { action: "hash", path: path.to_path_buf(), error: std::io::Error::other(e) })?
}

/// Fetches K3s releases for one architecture.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    arch: Arch,
    policy: FetchPolicy,
}

/// What one download attempt did.
struct Attempt {
    /// It continued a file an earlier attempt had started.
    resumed: bool,
}

impl Fetcher {
    /// A fetcher over HTTP(S). TLS needs the process' rustls crypto provider installed first
    /// (`hexa_shared::install_crypto_provider`).
    pub fn new(arch: Arch, policy: FetchPolicy) -> Result<Fetcher, FetchError> {
        let client = reqwest::Client::builder()
            .connect_timeout(policy.connect_timeout)
            .read_timeout(policy.idle_timeout)
            .user_agent(concat!("hexa-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Client(error_chain(&e)))?;
        Ok(Fetcher { client, arch, policy })
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    fn url(base: &str, version: &str, file: &str) -> String {
        format!("{}/{version}/{file}", base.trim_end_matches('/'))
    }

    /// The sha256 the release publishes for this architecture's binary.
    pub async fn expected_sha256(
        &self,
        root: &Path,
        source: &ArtifactSource,
        version: &str,
    ) -> Result<String, FetchError> {
        let checksum_name = self.arch.checksum_name();
        let (listing, where_) = match source {
            // The operator's pin is the trusted source; the release's own listing is not asked.
            ArtifactSource::Url { sha256: Some(pin), .. } => return Ok(pin.clone()),
            ArtifactSource::Url { base, sha256: None } => {
                let url = Fetcher::url(base, version, &checksum_name);
                let body = self.with_retries(&url, || self.get_small(&url, version)).await?;
                (String::from_utf8_lossy(&body).into_owned(), url)
            }
            ArtifactSource::AirGap { dir } => {
                let path = paths::under(root, &dir.join(version).join(&checksum_name));
                let listing = match fs::read_to_string(&path) {
                    Ok(listing) => listing,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(FetchError::AirGapMissing { path, file: checksum_name });
                    }
                    Err(e) => return Err(io_error("read", &path)(e)),
                };
                (listing, path.display().to_string())
            }
        };
        let file = self.arch.binary_name();
        checksum_for(&listing, file).ok_or_else(|| FetchError::NoChecksum { listing: where_, file: file.to_string() })
    }

    /// Gets the binary into `download_dir` and checks it against `expected`; returns the verified
    /// file, which the caller installs and then removes. Nothing outside `download_dir` changes.
    pub async fn fetch_binary(
        &self,
        root: &Path,
        source: &ArtifactSource,
        version: &str,
        expected: &str,
        download_dir: &Path,
    ) -> Result<PathBuf, FetchError> {
        fs::create_dir_all(download_dir).map_err(io_error("create directory", download_dir))?;
        let staged = download_dir.join(format!("k3s-{expected}.part"));
        remove_other_downloads(download_dir, &staged);
        match source {
            ArtifactSource::Url { base, .. } => {
                let url = Fetcher::url(base, version, self.arch.binary_name());
                self.download_verified(&url, version, &staged, expected).await?;
            }
            ArtifactSource::AirGap { dir } => {
                let from = paths::under(root, &dir.join(version).join(self.arch.binary_name()));
                if !from.exists() {
                    return Err(FetchError::AirGapMissing { path: from, file: self.arch.binary_name().to_string() });
                }
                copy_file(&from, &staged).await?;
                self.verify(&staged, &from.display().to_string(), expected).await?;
            }
        }
        Ok(staged)
    }

    /// Checks `file` against `expected`, removing it when it does not match.
    async fn verify(&self, file: &Path, what: &str, expected: &str) -> Result<(), FetchError> {
        let actual = sha256_file(file).await?;
        if actual == expected {
            return Ok(());
        }
        let _ = fs::remove_file(file);
        Err(FetchError::ChecksumMismatch { what: what.to_string(), expected: expected.to_string(), actual })
    }

    async fn download_verified(
        &self,
        url: &str,
        version: &str,
        staged: &Path,
        expected: &str,
    ) -> Result<(), FetchError> {
        let mut fresh_retry_left = true;
        loop {
            let attempt = self.with_retries(url, || self.download_once(url, version, staged)).await?;
            match self.verify(staged, url, expected).await {
                Ok(()) => return Ok(()),
                // A resumed file may join two different uploads of the artifact: start over once.
                Err(e) if attempt.resumed && fresh_retry_left => {
                    warn!(url, error = %e, "resumed download does not verify; downloading it again from the start");
                    fresh_retry_left = false;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let ceiling = self.policy.backoff_base.saturating_mul(1u32 << failures.min(16)).min(self.policy.backoff_max);
        ceiling / 2 + ceiling.mul_f64(rand::random::<f64>() / 2.0)
    }

    /// Runs `attempt` until it succeeds, fails for good, or has used up the policy's attempts.
    async fn with_retries<T, F, Fut>(&self, url: &str, mut attempt: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, FetchError>>,
    {
        let attempts = self.policy.attempts.max(1);
        let mut failures = 0;
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    failures += 1;
                    if failures >= attempts {
                        return Err(FetchError::GaveUp { url: url.to_string(), attempts, last: Box::new(e) });
                    }
                    let delay = self.backoff(failures - 1);
                    warn!(url, attempt = failures, of = attempts, retry_in_ms = delay.as_millis() as u64, error = %e, "download attempt failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Sends `request` and waits for the response headers, bounded.
    async fn send(&self, url: &str, request: reqwest::RequestBuilder) -> Result<reqwest::Response, FetchError> {
        match tokio::time::timeout(self.policy.response_timeout, request.send()).await {
            Err(_) => Err(FetchError::Timeout {
                url: url.to_string(),
                what: "no response",
                after: self.policy.response_timeout,
            }),
            Ok(Err(e)) if e.is_timeout() && e.is_connect() => Err(FetchError::Timeout {
                url: url.to_string(),
                what: "no connection",
                after: self.policy.connect_timeout,
            }),
            // reqwest's read timeout, which is the idle timeout, can expire before ours.
            Ok(Err(e)) if e.is_timeout() => Err(FetchError::Timeout {
                url: url.to_string(),
                what: "no response",
                after: self.policy.idle_timeout.min(self.policy.response_timeout),
            }),
            Ok(Err(e)) => Err(FetchError::Network { url: url.to_string(), message: error_chain(&e) }),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// The next piece of a body: `None` at its end; a silence longer than the idle timeout fails.
    async fn next_chunk(
        &self,
        url: &str,
        response: &mut reqwest::Response,
        received: u64,
        expected: Option<u64>,
    ) -> Result<Option<impl AsRef<[u8]> + use<>>, FetchError> {
        match tokio::time::timeout(self.policy.idle_timeout, response.chunk()).await {
            Err(_) => {
                Err(FetchError::Timeout { url: url.to_string(), what: "no data", after: self.policy.idle_timeout })
            }
            Ok(Ok(chunk)) => Ok(chunk),
            // reqwest's read timeout is the idle timeout too.
            Ok(Err(e)) if e.is_timeout() => {
                Err(FetchError::Timeout { url: url.to_string(), what: "no data", after: self.policy.idle_timeout })
            }
            Ok(Err(_)) if expected.is_some_and(|expected| received < expected) => {
                Err(FetchError::Truncated { url: url.to_string(), received, expected: expected.unwrap_or_default() })
            }
            Ok(Err(e)) => Err(FetchError::Network { url: url.to_string(), message: error_chain(&e) }),
        }
    }

    fn check_status(url: &str, version: &str, status: StatusCode) -> Result<(), FetchError> {
        match status {
            StatusCode::NOT_FOUND => Err(FetchError::NotFound { url: url.to_string(), version: version.to_string() }),
            s if s.is_success() => Ok(()),
            s => Err(FetchError::Status { url: url.to_string(), status: s.as_u16() }),
        }
    }

    /// A small file (the checksum listing) into memory, bounded.
    async fn get_small(&self, url: &str, version: &str) -> Result<Vec<u8>, FetchError> {
        let mut response = self.send(url, self.client.get(url)).await?;
        Fetcher::check_status(url, version, response.status())?;
        let expected = response.content_length();
        if expected.is_some_and(|len| len > MAX_CHECKSUM_FILE_BYTES) {
            return Err(FetchError::TooLarge { url: url.to_string(), limit: MAX_CHECKSUM_FILE_BYTES });
        }
        let mut body = Vec::new();
        while let Some(chunk) = self.next_chunk(url, &mut response, body.len() as u64, expected).await? {
            body.extend_from_slice(chunk.as_ref());
            if body.len() as u64 > MAX_CHECKSUM_FILE_BYTES {
                return Err(FetchError::TooLarge { url: url.to_string(), limit: MAX_CHECKSUM_FILE_BYTES });
            }
        }
        Ok(body)
    }

    /// One attempt at the binary: continues `staged` where an earlier attempt stopped when the
    /// server honours the range, starts it over when it does not.
    async fn download_once(&self, url: &str, version: &str, staged: &Path) -> Result<Attempt, FetchError> {
        let offset = match fs::metadata(staged) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_error("inspect", staged)(e)),
        };
        let mut request = self.client.get(url);
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        let mut response = self.send(url, request).await?;
        let status = response.status();
        let resumed = match status {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let range = response.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or_default();
                if !range.starts_with(&format!("bytes {offset}-")) {
                    // Not the part asked for: start over rather than splice the wrong bytes.
                    let _ = fs::remove_file(staged);
                    return Err(FetchError::Network {
                        url: url.to_string(),
                        message: format!("asked for bytes {offset}- and got range {range:?}"),
                    });
                }
                true
            }
            // The earlier attempts already got every byte; verification decides whether they are right.
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => return Ok(Attempt { resumed: true }),
            _ => {
                Fetcher::check_status(url, version, status)?;
                false
            }
        };
        let expected = response.content_length().map(|len| len + if resumed { offset } else { 0 });
        if expected.is_some_and(|len| len > self.policy.max_binary_bytes) {
            return Err(FetchError::TooLarge { url: url.to_string(), limit: self.policy.max_binary_bytes });
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(staged)
            .await
            .map_err(io_error("open", staged))?;
        let mut received = if resumed { offset } else { 0 };
        info!(url, resume_from = received, total = expected, "downloading k3s");
        let started = Instant::now();
        let mut last_report = started;
        loop {
            let chunk = match self.next_chunk(url, &mut response, received, expected).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    // Keep what arrived for the next attempt to resume from.
                    let _ = file.flush().await;
                    return Err(e);
                }
            };
            let chunk = chunk.as_ref();
            file.write_all(chunk).await.map_err(io_error("write", staged))?;
            received += chunk.len() as u64;
            if received > self.policy.max_binary_bytes {
                let _ = fs::remove_file(staged);
                return Err(FetchError::TooLarge { url: url.to_string(), limit: self.policy.max_binary_bytes });
            }
            if last_report.elapsed() >= self.policy.progress_every {
                last_report = Instant::now();
                let percent = expected.filter(|&e| e > 0).map(|e| received * 100 / e);
                info!(url, received, total = expected, percent, "k3s download progress");
            }
        }
        if let Some(expected) = expected.filter(|&e| received < e) {
            return Err(FetchError::Truncated { url: url.to_string(), received, expected });
        }
        file.sync_all().await.map_err(io_error("fsync", staged))?;
        info!(url, bytes = received, elapsed_ms = started.elapsed().as_millis() as u64, resumed, "k3s downloaded");
        Ok(Attempt { resumed: resumed || offset > 0 })
    }
}

/// Removes downloads of other artifacts (other versions) left by failed attempts.
fn remove_other_downloads(dir: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path != keep && path.extension().is_some_and(|e| e == "part") {
            debug!(path = %path.display(), "removing an abandoned download");
            let _ = fs::remove_file(&path);
        }
    }
}

/// Copies `from` to `to` (replacing it) and fsyncs the copy.
async fn copy_file(from: &Path, to: &Path) -> Result<(), FetchError> {
    let (from, to) = (from.to_path_buf(), to.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let mut source = fs::File::open(&from).map_err(io_error("open", &from))?;
        let mut dest = fs::File::create(&to).map_err(io_error("create", &to))?;
        std::io::copy(&mut source, &mut dest).map_err(io_error("copy to", &to))?;
        dest.sync_all().map_err(io_error("fsync", &to))
    })
    .await
    .map_err(|e| FetchError::Io { action: "copy", path: PathBuf::new(), error: std::io::Error::other(e) })?
}

/// An error with its causes, which reqwest keeps in its source chain ("error sending request" alone
/// says nothing).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_listings_are_read_like_sha256sum() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let listing = format!("{a}  k3s\n{b}  k3s-arm64\n{a}  k3s-airgap-images-amd64.tar.zst\n{b} *k3s-armhf\n");
        assert_eq!(checksum_for(&listing, "k3s"), Some(a.clone()));
        assert_eq!(checksum_for(&listing, "k3s-arm64"), Some("b".repeat(64)));
        assert_eq!(checksum_for(&listing, "k3s-armhf"), Some("b".repeat(64)));
        assert_eq!(checksum_for(&listing, "k3s-s390x"), None);
        assert_eq!(checksum_for("nothex  k3s\n", "k3s"), None);
    }

    #[test]
    fn release_file_names_follow_the_architecture() {
        assert_eq!((Arch::Amd64.binary_name(), Arch::Amd64.checksum_name().as_str()), ("k3s", "sha256sum-amd64.txt"));
        assert_eq!(
            (Arch::Arm64.binary_name(), Arch::Arm64.checksum_name().as_str()),
            ("k3s-arm64", "sha256sum-arm64.txt")
        );
        assert_eq!(
            Fetcher::url("https://github.com/k3s-io/k3s/releases/download/", "v1.35.5+k3s1", "k3s"),
            "https://github.com/k3s-io/k3s/releases/download/v1.35.5+k3s1/k3s"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = FetchPolicy {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            ..FetchPolicy::default()
        };
        crate::k3s::testkit::init();
        let fetcher = Fetcher::new(Arch::Amd64, policy).unwrap();
        for (failures, low, high) in [(0, 50, 100), (1, 100, 200), (3, 400, 800), (10, 500, 1000)] {
            let delay = fetcher.backoff(failures).as_millis();
            assert!((low..=high).contains(&delay), "after {failures} failures: {delay} ms");
        }
    }
}
