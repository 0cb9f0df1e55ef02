//! Listener documents for the unit tests of the listener settings modules.

use serde_json::{json, Value};

use crate::definition::{Definition, DefinitionKind, ListenerDefinition};
use crate::schema::SchemaRegistry;

/// A valid server-mode listener document with `extra`'s fields set over it.
pub fn listener(extra: Value) -> Value {
    let mut base = json!({"key": "plant-a", "name": "Plant A", "listenerType": "websocket",
        "mode": "server", "contentType": "json", "path": "/devices", "sentinel": "keys"});
    for (k, v) in extra.as_object().expect("an object of fields") {
        base[k] = v.clone();
    }
    base
}

/// Parses a listener document; the pointers of its problems when it is refused.
pub fn parse(document: &Value) -> Result<ListenerDefinition, Vec<String>> {
    match Definition::parse(
        &SchemaRegistry::new(),
        DefinitionKind::Listener,
        document,
        false,
    ) {
        Ok(Definition::Listener(d)) => Ok(d),
        Ok(other) => panic!("not a listener: {other:?}"),
        Err(problems) => Err(problems.into_iter().map(|p| p.pointer).collect()),
    }
}
