//! Rate-limit counters: one item per user, scope and fixed window (`RATE#`), removed by TTL
//! when the window ends.

use super::*;

impl Store {
    /// Counts one attempt that writes nothing else with it (an API-key check, a completion).
    pub async fn count_attempt(
        &self,
        user_id: &UserId,
        scope: Scope,
        window: &RateWindow,
    ) -> Result<Admission, StoreError> {
        let count = self.rate_counter(user_id, scope, window);
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(count.key))
            .update_expression(count.expression)
            .condition_expression(count.condition)
            .set_expression_attribute_values(Some(count.values))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Admission::Admitted),
            Err(e) if is_condition_failure(&e) => Ok(Admission::Limited),
            Err(e) => Err(e.into()),
        }
    }

    /// `hits + 1` on the window's counter unless it already reached the limit; the counter
    /// expires (TTL) when its window ends.
    pub(super) fn rate_counter(
        &self,
        user_id: &UserId,
        scope: Scope,
        window: &RateWindow,
    ) -> CounterUpdate {
        CounterUpdate {
            key: key(
                format!("RATE#{}", user_id.as_str()),
                format!("{}#{}", scope.key(), window.starts_at),
            ),
            expression: "ADD hits :one SET expires_at = :ends",
            condition: "attribute_not_exists(hits) OR hits < :limit",
            values: HashMap::from([
                (":one".to_owned(), number(1)),
                (":ends".to_owned(), number(window.ends_at)),
                (":limit".to_owned(), number(i64::from(window.limit))),
            ]),
        }
    }
}

pub(super) struct CounterUpdate {
    pub(super) key: Item,
    pub(super) expression: &'static str,
    pub(super) condition: &'static str,
    pub(super) values: Item,
}
