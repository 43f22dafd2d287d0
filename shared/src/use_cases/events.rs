//! Connection lifecycle events for the host app, derived from the table's DynamoDB stream by
//! the `events` function and published to an EventBridge bus (`EVENT_BUS_NAME`).
//!
//! Why the stream: every write path (connect, completion, refresh, disconnect, and any added
//! later) changes the connection item, and the stream carries every change at least once,
//! in order per item, even when the function that wrote it dies right after its write. No
//! write path has to remember to publish, and none can publish something that did not land.
//! An outbox would need each write path to add an item to its transaction.
//!
//! At least once: a batch whose events cannot all be put fails the invocation, and Lambda's
//! event source mapping retries it (then splits it, then sends it to a dead-letter queue).
//! Redelivered records give the same events with the same `eventId` (derived from the stream
//! record's id), so consumers de-duplicate by it. Nothing secret is in an event: they are
//! built from the item's plain attributes; the sealed credentials are never read.

use crate::adapters::event_bus::{Entry, EventBus, MAX_ENTRIES};
use crate::adapters::store::connection_from_image;
use crate::domain::model::{AuthType, Connection, ConnectionStatus, StatusReason};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use time::OffsetDateTime;
use uuid::Uuid;

/// Attempts for entries EventBridge did not take (throttling, internal errors).
pub const PUT_ATTEMPTS: u32 = 3;
pub const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Namespace of event ids (UUID v5 of the stream record's id and the event's type).
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x3f0c_9a3e_51d2_4c7e_8b1a_6d44_0e9f_2c17);

/// A DynamoDB stream batch as Lambda delivers it (only what is read).
#[derive(Debug, Deserialize)]
pub struct StreamEvent {
    #[serde(rename = "Records", default)]
    pub records: Vec<StreamRecord>,
}

#[derive(Debug, Deserialize)]
pub struct StreamRecord {
    #[serde(rename = "eventID")]
    pub event_id: String,
    #[serde(rename = "eventName")]
    pub event_name: String,
    pub dynamodb: StreamChange,
}

#[derive(Debug, Deserialize)]
pub struct StreamChange {
    /// Epoch seconds.
    #[serde(rename = "ApproximateCreationDateTime", default)]
    pub approximate_creation: Option<f64>,
    #[serde(rename = "NewImage", default)]
    pub new_image: Option<serde_dynamo::Item>,
    #[serde(rename = "OldImage", default)]
    pub old_image: Option<serde_dynamo::Item>,
}

/// What happened to a connection, as the host app hears of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Created,
    Reauthorized,
    NeedsReauth,
    Degraded,
    Recovered,
    Disconnected,
}

impl Transition {
    pub fn detail_type(self) -> &'static str {
        match self {
            Self::Created => "Connection Created",
            Self::Reauthorized => "Connection Reauthorized",
            Self::NeedsReauth => "Connection Needs Reauth",
            Self::Degraded => "Connection Degraded",
            Self::Recovered => "Connection Recovered",
            Self::Disconnected => "Connection Disconnected",
        }
    }
}

/// An event's `detail`: never a token, key or code.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Detail {
    pub event_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    pub user_id: String,
    pub connection_id: String,
    pub klaviyo_account_id: String,
    pub account_name: String,
    pub auth_type: AuthType,
    /// `active`, `needs_reauth`, or `disconnected`.
    pub status: &'static str,
    /// `refresh_refused` or `api_key_refused` (needs reauth), `refresh_failing` (degraded).
    pub reason: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleEvent {
    pub transition: Transition,
    pub detail: Detail,
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("a stream record could not be read: {0}")]
    Malformed(String),
    #[error("EventBridge did not take {failed} of {total} events: {reason}")]
    NotPublished {
        failed: usize,
        total: usize,
        reason: String,
    },
}

/// The transition a change of one connection item is, if any. Writes that change nothing the
/// host app cares about (a refresh, a lease, a backoff before the token expires) are none.
pub fn transition(old: Option<&Connection>, new: Option<&Connection>) -> Option<Transition> {
    match (old, new) {
        (None, Some(_)) => Some(Transition::Created),
        (Some(_), None) => Some(Transition::Disconnected),
        (Some(old), Some(new)) if new.authorized_at != old.authorized_at => {
            Some(Transition::Reauthorized)
        }
        (Some(old), Some(new)) => match (old.status, new.status) {
            (ConnectionStatus::Active, ConnectionStatus::NeedsReauth) => {
                Some(Transition::NeedsReauth)
            }
            (ConnectionStatus::Active, ConnectionStatus::Active) => {
                match (old.degraded, new.degraded) {
                    (false, true) => Some(Transition::Degraded),
                    (true, false) => Some(Transition::Recovered),
                    _ => None,
                }
            }
            _ => None,
        },
        (None, None) => None,
    }
}

/// The events of a stream batch, in order. A connection image that cannot be read (a bug, or
/// an item of a newer version during a rollback) is logged and skipped rather than failing
/// the batch: retrying cannot fix it, and it would hold back every later change of the shard.
pub fn events_of(batch: &StreamEvent) -> Result<Vec<LifecycleEvent>, EventsError> {
    let mut events = Vec::new();
    for record in &batch.records {
        let image = |item: &Option<serde_dynamo::Item>| match item {
            Some(item) => connection_from_image(item.clone()),
            None => Ok(None),
        };
        let (old, new) = match (
            image(&record.dynamodb.old_image),
            image(&record.dynamodb.new_image),
        ) {
            (Ok(old), Ok(new)) => (old, new),
            _ => {
                // The error names no value: an attribute's text could be anything.
                tracing::error!(
                    event = "stream_record_unreadable",
                    stream_record_id = %record.event_id,
                    "a connection change in the table's stream could not be read; skipped"
                );
                continue;
            }
        };
        // Keep to what the record says happened (an INSERT has no old image worth reading).
        let (old, new) = match record.event_name.as_str() {
            "INSERT" => (None, new),
            "REMOVE" => (old, None),
            _ => (old, new),
        };
        let Some(transition) = transition(old.as_ref(), new.as_ref()) else {
            continue;
        };
        let Some(connection) = new.as_ref().or(old.as_ref()) else {
            continue;
        };
        let occurred_at = record
            .dynamodb
            .approximate_creation
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs as i64).ok())
            .unwrap_or(connection.updated_at);
        events.push(LifecycleEvent {
            transition,
            detail: detail(&record.event_id, transition, connection, occurred_at),
        });
    }
    Ok(events)
}

fn detail(
    record_id: &str,
    transition: Transition,
    connection: &Connection,
    occurred_at: OffsetDateTime,
) -> Detail {
    let name = format!("{record_id}\n{}", transition.detail_type());
    let (status, reason) = match transition {
        Transition::Disconnected => ("disconnected", None),
        Transition::NeedsReauth => (
            "needs_reauth",
            Some(
                match connection
                    .status_reason
                    .unwrap_or(StatusReason::RefreshRefused)
                {
                    StatusReason::RefreshRefused => "refresh_refused",
                    StatusReason::ApiKeyRefused => "api_key_refused",
                },
            ),
        ),
        Transition::Degraded => ("active", Some("refresh_failing")),
        _ => (
            match connection.status {
                ConnectionStatus::Active => "active",
                ConnectionStatus::NeedsReauth => "needs_reauth",
            },
            None,
        ),
    };
    Detail {
        event_id: Uuid::new_v5(&EVENT_NAMESPACE, name.as_bytes()).to_string(),
        occurred_at,
        user_id: connection.user_id.as_str().to_owned(),
        connection_id: connection.id.clone(),
        klaviyo_account_id: connection.klaviyo_account_id.clone(),
        account_name: connection.account_name.clone(),
        auth_type: connection.auth_type,
        status,
        reason,
    }
}

/// Publishes a batch's events on the bus.
#[derive(Debug, Clone)]
pub struct Publisher {
    bus: EventBus,
}

impl Publisher {
    pub fn new(bus: EventBus) -> Self {
        Self { bus }
    }

    /// Publishes every event of the batch, ten per call; entries EventBridge does not take are
    /// tried again (`PUT_ATTEMPTS`). Any left over fail the whole batch, which the event
    /// source mapping then delivers again.
    pub async fn publish(&self, batch: &StreamEvent) -> Result<usize, EventsError> {
        let events = events_of(batch)?;
        for chunk in events.chunks(MAX_ENTRIES) {
            self.put(chunk).await?;
        }
        for event in &events {
            tracing::info!(
                event = "lifecycle_event_published",
                detail_type = event.transition.detail_type(),
                event_id = %event.detail.event_id,
                user_id = %event.detail.user_id,
                connection_id = %event.detail.connection_id,
                "connection event published"
            );
        }
        Ok(events.len())
    }

    async fn put(&self, events: &[LifecycleEvent]) -> Result<(), EventsError> {
        let mut pending: Vec<&LifecycleEvent> = events.iter().collect();
        let mut reason = String::new();
        for attempt in 1..=PUT_ATTEMPTS {
            let entries = pending
                .iter()
                .map(|event| entry(event))
                .collect::<Result<Vec<_>, _>>()?;
            match self.bus.put(&entries).await {
                Ok(refused) if refused.positions.is_empty() => return Ok(()),
                Ok(refused) => {
                    reason = refused.reason;
                    pending = refused.positions.iter().map(|&i| pending[i]).collect();
                }
                Err(failure) => reason = failure,
            }
            if attempt < PUT_ATTEMPTS {
                tokio::time::sleep(RETRY_PAUSE * attempt).await;
            }
        }
        Err(EventsError::NotPublished {
            failed: pending.len(),
            total: events.len(),
            reason,
        })
    }
}

fn entry(event: &LifecycleEvent) -> Result<Entry<'static>, EventsError> {
    let detail =
        serde_json::to_string(&event.detail).map_err(|e| EventsError::Malformed(e.to_string()))?;
    Ok(Entry {
        detail_type: event.transition.detail_type(),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::crypto::SealedBlob;
    use crate::adapters::store::image_of;
    use serde_json::json;

    fn connection() -> Connection {
        crate::domain::model::sample_connection(
            OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
        )
    }

    fn record(
        id: &str,
        name: &str,
        old: Option<&Connection>,
        new: Option<&Connection>,
    ) -> serde_json::Value {
        let mut change = json!({"ApproximateCreationDateTime": 1_800_000_100.0});
        if let Some(old) = old {
            change["OldImage"] = serde_json::to_value(image_of(old)).unwrap();
        }
        if let Some(new) = new {
            change["NewImage"] = serde_json::to_value(image_of(new)).unwrap();
        }
        json!({"eventID": id, "eventName": name, "eventSource": "aws:dynamodb", "dynamodb": change})
    }

    fn batch(records: Vec<serde_json::Value>) -> StreamEvent {
        serde_json::from_value(json!({ "Records": records })).unwrap()
    }

    #[test]
    fn each_change_is_the_transition_the_host_app_hears_of() {
        let base = connection();
        let refreshed = Connection {
            last_refreshed_at: Some(base.updated_at),
            credentials: SealedBlob::from_bytes(b"other".to_vec()),
            version: 2,
            ..base.clone()
        };
        let reconnected = Connection {
            authorized_at: base.authorized_at + time::Duration::days(1),
            version: 2,
            ..base.clone()
        };
        let refused = Connection {
            status: ConnectionStatus::NeedsReauth,
            status_reason: Some(StatusReason::RefreshRefused),
            ..base.clone()
        };
        let degraded = Connection {
            degraded: true,
            refresh_failures: 3,
            ..base.clone()
        };
        let backing_off = Connection {
            refresh_failures: 1,
            ..base.clone()
        };
        let cases: [(Option<&Connection>, Option<&Connection>, Option<Transition>); 10] = [
            (None, Some(&base), Some(Transition::Created)),
            (Some(&base), None, Some(Transition::Disconnected)),
            (
                Some(&base),
                Some(&reconnected),
                Some(Transition::Reauthorized),
            ),
            (
                Some(&refused),
                Some(&reconnected),
                Some(Transition::Reauthorized),
            ),
            (Some(&base), Some(&refused), Some(Transition::NeedsReauth)),
            (Some(&base), Some(&degraded), Some(Transition::Degraded)),
            (
                Some(&degraded),
                Some(&refreshed),
                Some(Transition::Recovered),
            ),
            (Some(&base), Some(&refreshed), None),
            (Some(&base), Some(&backing_off), None),
            (Some(&refused), Some(&refused), None),
        ];
        for (old, new, expected) in cases {
            assert_eq!(transition(old, new), expected, "{old:?} -> {new:?}");
        }
    }

    #[test]
    fn events_carry_the_documented_detail_and_a_stable_id_but_nothing_secret() {
        let base = connection();
        let refused = Connection {
            status: ConnectionStatus::NeedsReauth,
            status_reason: Some(StatusReason::RefreshRefused),
            ..base.clone()
        };
        let stream = batch(vec![
            record("r1", "INSERT", None, Some(&base)),
            record("r2", "MODIFY", Some(&base), Some(&base)),
            record("r3", "MODIFY", Some(&base), Some(&refused)),
            record("r4", "REMOVE", Some(&refused), None),
        ]);
        let events = events_of(&stream).unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.transition).collect();
        assert_eq!(
            kinds,
            [
                Transition::Created,
                Transition::NeedsReauth,
                Transition::Disconnected
            ]
        );
        let detail = serde_json::to_value(&events[1].detail).unwrap();
        let mut keys: Vec<&str> = detail
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut documented = [
            "eventId",
            "occurredAt",
            "userId",
            "connectionId",
            "klaviyoAccountId",
            "accountName",
            "authType",
            "status",
            "reason",
        ];
        documented.sort_unstable();
        assert_eq!(keys, documented);
        assert_eq!(detail["status"], "needs_reauth");
        assert_eq!(detail["reason"], "refresh_refused");
        assert_eq!(detail["authType"], "oauth");
        assert_eq!(detail["occurredAt"], "2027-01-15T08:01:40Z");
        assert_eq!(events[2].detail.status, "disconnected");
        let text =
            serde_json::to_string(&events.iter().map(|e| &e.detail).collect::<Vec<_>>()).unwrap();
        assert!(!text.contains("sealed-secret-bytes") && !text.contains("c2VhbGVk"));

        // The same record delivered again: the same events, the same ids.
        let again = events_of(&batch(vec![record(
            "r3",
            "MODIFY",
            Some(&base),
            Some(&refused),
        )]))
        .unwrap();
        assert_eq!(again[0], events[1]);
        assert_ne!(events[0].detail.event_id, events[1].detail.event_id);
    }

    #[test]
    fn other_items_are_no_events_and_an_unreadable_record_is_skipped() {
        let other = json!({
            "eventID": "x", "eventName": "INSERT",
            "dynamodb": {"NewImage": {"pk": {"S": "REVOKE#1"}, "sk": {"S": "REVOKE"}}}
        });
        assert!(events_of(&batch(vec![other])).unwrap().is_empty());
        let broken = json!({
            "eventID": "y", "eventName": "INSERT",
            "dynamodb": {"NewImage": {"pk": {"S": "USER#a"}, "sk": {"S": "CONN#1"}}}
        });
        let base = connection();
        let events = events_of(&batch(vec![
            broken,
            record("z", "INSERT", None, Some(&base)),
        ]))
        .unwrap();
        assert_eq!(events.len(), 1, "the readable change after it still counts");
        assert_eq!(events[0].transition, Transition::Created);
    }
}
