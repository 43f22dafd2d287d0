//! Logging: one JSON object per line on stdout (CloudWatch parses it), level from `RUST_LOG`
//! (default `info,aws_config=warn,aws_smithy_runtime=warn`). `RUST_LOG` takes comma-separated
//! `level` and `target=level` directives (`tracing_subscriber`'s `Targets`; no span or field
//! filters, which would bring a regex engine into every binary); one it cannot read leaves
//! the default. Nothing logs tokens: they live in `Secret`, which prints `[redacted]`, and
//! request logging records method and path only.

use tracing_subscriber::filter::Targets;
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
    // `try_init` so a second call (tests) is harmless.
    let _ = tracing_subscriber::registry()
        .with(log)
        .with(filter(std::env::var("RUST_LOG").ok().as_deref()))
        .try_init();
}

fn filter(setting: Option<&str>) -> Targets {
    let default = || DEFAULT_FILTER.parse().expect("the default filter parses");
    match setting.map(str::trim) {
        Some(directives) if !directives.is_empty() => {
            directives.parse().unwrap_or_else(|_| default())
        }
        _ => default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn rust_log_sets_levels_by_target_and_a_bad_one_leaves_the_default() {
        let set = filter(Some("warn,shared=debug"));
        assert!(set.would_enable("shared::refresh", &Level::DEBUG));
        assert!(!set.would_enable("aws_config", &Level::INFO));
        for unreadable in [None, Some(""), Some("shared=loud")] {
            let default = filter(unreadable);
            assert!(
                default.would_enable("shared", &Level::INFO),
                "{unreadable:?}"
            );
            assert!(!default.would_enable("aws_config::profile", &Level::INFO));
            assert!(default.would_enable("aws_config::profile", &Level::WARN));
        }
    }
}
