//! JSON Schema registry: the schemas in `schemas/` compiled once at start-up, and validation that
//! reports **every** problem with its JSON pointer, the way an operator wants to read it.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use crate::definition::DefinitionKind;

/// One thing wrong with a submitted document: where (RFC 6901 pointer) and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub pointer: String,
    pub message: String,
}

impl Problem {
    pub fn new(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            pointer: pointer.into(),
            message: message.into(),
        }
    }
}

/// Schema names served at `/api/v1/schemas/{name}`; the definition kinds plus the device, user
/// and API token bodies.
pub const SCHEMA_NAMES: [&str; 12] = [
    "listener",
    "sentinel",
    "route",
    "downstream",
    "device",
    "device-patch",
    "user",
    "user-patch",
    "password-change",
    "api-token",
    "device-token",
    "token-secret-rotation",
];

fn schema_source(name: &str) -> Option<&'static str> {
    Some(match name {
        "listener" => include_str!("../../../schemas/listener.json"),
        "sentinel" => include_str!("../../../schemas/sentinel.json"),
        "route" => include_str!("../../../schemas/route.json"),
        "downstream" => include_str!("../../../schemas/downstream.json"),
        "device" => include_str!("../../../schemas/device.json"),
        "device-patch" => include_str!("../../../schemas/device-patch.json"),
        "user" => include_str!("../../../schemas/user.json"),
        "user-patch" => include_str!("../../../schemas/user-patch.json"),
        "password-change" => include_str!("../../../schemas/password-change.json"),
        "api-token" => include_str!("../../../schemas/api-token.json"),
        "device-token" => include_str!("../../../schemas/device-token.json"),
        "token-secret-rotation" => include_str!("../../../schemas/token-secret-rotation.json"),
        _ => return None,
    })
}

/// Compiled validators, one per schema; built once and shared (validation is `&self`).
pub struct SchemaRegistry {
    documents: HashMap<&'static str, Value>,
    validators: HashMap<&'static str, jsonschema::Validator>,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("schemas", &self.documents.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SchemaRegistry {
    /// Compiles every bundled schema. A schema that does not compile is a build defect, so this
    /// panics rather than limping on without validation.
    pub fn new() -> Self {
        let mut documents = HashMap::new();
        let mut validators = HashMap::new();
        for name in SCHEMA_NAMES {
            let source = schema_source(name).expect("every listed schema is bundled");
            let document: Value = serde_json::from_str(source)
                .unwrap_or_else(|e| panic!("schemas/{name}.json is not JSON: {e}"));
            let validator = jsonschema::draft202012::new(&document)
                .unwrap_or_else(|e| panic!("schemas/{name}.json does not compile: {e}"));
            documents.insert(name, document);
            validators.insert(name, validator);
        }
        Self {
            documents,
            validators,
        }
    }

    /// The schema document itself, for the API and the UI's generated forms.
    pub fn document(&self, name: &str) -> Option<&Value> {
        self.documents.get(name)
    }

    /// Every schema violation of `instance`, sorted by pointer for stable output.
    pub fn problems(&self, name: &str, instance: &Value) -> Vec<Problem> {
        let Some(validator) = self.validators.get(name) else {
            return vec![Problem::new("", format!("unknown schema {name}"))];
        };
        let mut problems: Vec<Problem> = validator
            .iter_errors(instance)
            .map(|error| describe(&error))
            .collect();
        problems.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        problems.dedup();
        problems
    }

    /// Validates a definition document against its kind's schema.
    pub fn definition_problems(&self, kind: DefinitionKind, instance: &Value) -> Vec<Problem> {
        self.problems(kind.schema_name(), instance)
    }
}

impl Default for SchemaRegistry {
    fn default() -> Self {
        Self::new()
    }
}

/// Turns a jsonschema error into a [`Problem`]. For unknown properties the pointer names the
/// offending property itself rather than its parent object, which is where a form shows it.
fn describe(error: &jsonschema::ValidationError<'_>) -> Problem {
    use jsonschema::error::ValidationErrorKind;
    let base = error.instance_path().to_string();
    match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let names = unexpected.join(", ");
            let pointer = match unexpected.as_slice() {
                [one] => format!("{base}/{}", escape_pointer_token(one)),
                _ => base,
            };
            Problem::new(pointer, format!("unknown field(s): {names}"))
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            Problem::new(
                format!("{base}/{}", escape_pointer_token(name)),
                format!("{name} is required"),
            )
        }
        _ => Problem::new(base, error.to_string()),
    }
}

/// RFC 6901 escaping of one reference token.
pub fn escape_pointer_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_every_problem_with_its_pointer() {
        let registry = SchemaRegistry::new();
        let problems = registry.problems(
            "listener",
            &json!({"key": "Bad_Key", "name": "x", "listenerType": "websocket", "mode": "server",
                    "contentType": "json", "path": "/d", "port": 70000, "bogus": 1}),
        );
        let pointers: Vec<&str> = problems.iter().map(|p| p.pointer.as_str()).collect();
        assert!(pointers.contains(&"/key"), "{problems:?}");
        assert!(pointers.contains(&"/port"), "{problems:?}");
        assert!(pointers.contains(&"/bogus"), "{problems:?}");
    }

    #[test]
    fn missing_required_field_points_at_the_field() {
        let registry = SchemaRegistry::new();
        let problems = registry.problems("route", &json!({"key": "abc", "name": "n"}));
        assert_eq!(
            problems,
            vec![Problem::new("/downstreams", "downstreams is required")]
        );
    }
}
