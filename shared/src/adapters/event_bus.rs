//! EventBridge: puts entries on this service's bus and says which ones it did not take.
//! What the entries mean, and what to do with the refused ones, is the events use case's.

use aws_sdk_eventbridge::types::PutEventsRequestEntry;

/// The `source` of every event.
pub const SOURCE: &str = "klaviyo-connect";
/// PutEvents takes at most this many entries per call.
pub const MAX_ENTRIES: usize = 10;

/// One event to put.
pub struct Entry<'a> {
    pub detail_type: &'a str,
    /// The event's `detail`, as JSON.
    pub detail: String,
}

/// The entries of a call EventBridge did not take, by position, and why (its first error code).
#[derive(Debug, Default)]
pub struct Refused {
    pub positions: Vec<usize>,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct EventBus {
    client: aws_sdk_eventbridge::Client,
    bus: String,
}

impl EventBus {
    pub fn new(client: aws_sdk_eventbridge::Client, bus: impl Into<String>) -> Self {
        Self {
            client,
            bus: bus.into(),
        }
    }

    /// Puts up to `MAX_ENTRIES` entries in one call. `Err` when the call itself failed.
    pub async fn put(&self, entries: &[Entry<'_>]) -> Result<Refused, String> {
        let request = entries
            .iter()
            .map(|entry| {
                PutEventsRequestEntry::builder()
                    .event_bus_name(&self.bus)
                    .source(SOURCE)
                    .detail_type(entry.detail_type)
                    .detail(&entry.detail)
                    .build()
            })
            .collect();
        let output = self
            .client
            .put_events()
            .set_entries(Some(request))
            .send()
            .await
            .map_err(|e| aws_sdk_eventbridge::error::DisplayErrorContext(&e).to_string())?;
        // Results come back in order; a refused entry carries an error code, and a missing
        // result counts as refused.
        let results = output.entries();
        let positions = (0..entries.len())
            .filter(|&i| results.get(i).is_none_or(|r| r.error_code().is_some()))
            .collect();
        let reason = results
            .iter()
            .find_map(|r| r.error_code())
            .unwrap_or("no result")
            .to_owned();
        Ok(Refused { positions, reason })
    }
}
