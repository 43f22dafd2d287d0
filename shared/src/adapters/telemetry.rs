//! Logging: one JSON object per line on stdout (CloudWatch parses it). The filter is the
//! default, `info` with `aws_config` and `aws_smithy_runtime` (the AWS SDK's configuration and
//! runtime, which log credentials' key ids at info) at `warn`, adjusted by `RUST_LOG`:
//! comma-separated `level` and `target=level` directives (`tracing_subscriber`'s `Targets`; no
//! span or field filters, which would bring a regex engine into every binary). `RUST_LOG`
//! changes what it names and keeps the rest of the default, so `shared=debug` does not
//! silence everything else and a stray word cannot turn logging off; one it cannot read
//! (`shared=loud`) leaves the default and says so in a warning. Nothing logs tokens: they
//! live in `Secret`, which prints `[redacted]`, and request logging records method and path
//! only.

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const DEFAULT_FILTER: &str = "info,aws_config=warn,aws_smithy_runtime=warn";

pub fn init() {
    let log = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false);
    let setting = std::env::var("RUST_LOG").ok();
    let (filter, readable) = filter(setting.as_deref());
    // `try_init` so a second call (tests) is harmless.
    let _ = tracing_subscriber::registry()
        .with(log)
        .with(filter)
        .try_init();
    if !readable {
        tracing::warn!(
            event = "rust_log_unreadable",
            "RUST_LOG could not be read; the default log filter applies"
        );
    }
}

/// The filter, and whether `RUST_LOG` (when set) could be read.
fn filter(setting: Option<&str>) -> (Targets, bool) {
    let default: Targets = DEFAULT_FILTER.parse().expect("the default filter parses");
    let Some(directives) = setting.map(str::trim).filter(|s| !s.is_empty()) else {
        return (default, true);
    };
    let Ok(mut filter) = directives.parse::<Targets>() else {
        return (default, false);
    };
    if filter.default_level().is_none() {
        filter = filter.with_default(default.default_level().unwrap_or(LevelFilter::INFO));
    }
    for (target, level) in default.iter() {
        if !filter.iter().any(|(named, _)| named == target) {
            filter = filter.with_target(target, level);
        }
    }
    (filter, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    fn enabled(filter: &Targets, target: &str, level: Level) -> bool {
        filter.would_enable(target, &level)
    }

    #[test]
    fn rust_log_changes_what_it_names_and_keeps_the_rest_of_the_default() {
        let (set, readable) = filter(Some("warn,shared=debug"));
        assert!(readable);
        assert!(enabled(&set, "shared::refresh", Level::DEBUG));
        assert!(
            !enabled(&set, "lambda_runtime", Level::INFO),
            "default level now warn"
        );
        assert!(!enabled(&set, "aws_config::profile", Level::INFO));

        // Naming one target keeps info elsewhere and the SDK at warn.
        let (one, _) = filter(Some("shared=debug"));
        assert!(enabled(&one, "lambda_runtime", Level::INFO));
        assert!(!enabled(&one, "aws_smithy_runtime::client", Level::INFO));
        assert!(enabled(&one, "aws_smithy_runtime::client", Level::WARN));

        // A stray word is a target of its own, not the end of logging.
        let (stray, _) = filter(Some("inf"));
        assert!(enabled(&stray, "shared", Level::INFO));
        assert!(enabled(&stray, "shared", Level::ERROR));

        // The SDK at info only when asked for by name.
        let (sdk, _) = filter(Some("aws_config=info"));
        assert!(enabled(&sdk, "aws_config::profile", Level::INFO));
    }

    #[test]
    fn an_unreadable_rust_log_leaves_the_default() {
        for (setting, readable) in [
            (None, true),
            (Some(" "), true),
            (Some("shared=loud"), false),
        ] {
            let (default, read) = filter(setting);
            assert_eq!(read, readable, "{setting:?}");
            assert!(enabled(&default, "shared", Level::INFO), "{setting:?}");
            assert!(!enabled(&default, "shared", Level::DEBUG));
            assert!(!enabled(&default, "aws_config::profile", Level::INFO));
            assert!(enabled(&default, "aws_config::profile", Level::WARN));
        }
    }
}
