//! A `tracing` layer that hands every supervision event (`event =
//! "actor.*"`) to the [`SupervisionLog`](agentgate_actors::metrics::SupervisionLog)
//! actor, for the admin page. Other events cost one field lookup.

use agentgate_actors::metrics::{Supervised, SUPERVISION};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, Layer};

pub struct SupervisionLayer;

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

impl<S: tracing::Subscriber> Layer<S> for SupervisionLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().fields().field("event").is_none() {
            return;
        }
        let Some(log) = SUPERVISION.get() else {
            return;
        };
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let is_supervision = fields
            .0
            .get("event")
            .and_then(Value::as_str)
            .is_some_and(|e| e.starts_with("actor."));
        if !is_supervision {
            return;
        }
        fields.0.insert(
            "level".into(),
            Value::from(event.metadata().level().as_str()),
        );
        fields.0.insert(
            "timestamp".into(),
            Value::from(agentgate_actors::protocol::now_iso()),
        );
        // Full mailbox: this one is only in the log.
        let _ = log.try_send(Supervised(Value::Object(fields.0)));
    }
}
