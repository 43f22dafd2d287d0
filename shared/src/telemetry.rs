//! Logging: one JSON object per line on stdout (CloudWatch parses it), level from
//! `RUST_LOG` (default `info`). Nothing logs tokens: they live in `Secret`, which prints
//! `[redacted]`, and request logging records method and path only.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    // `try_init` so a second call (tests) is harmless.
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(filter)
        .try_init();
}
