//! Every example under `schemas/examples/` is checked against its schema and the cross-field
//! rules: `valid-*.json` must parse, `invalid-*.json` must fail with exactly the listed pointers.

use std::path::Path;

use iotgate_core::{Definition, DefinitionKind, SchemaRegistry};
use serde_json::Value;

#[test]
fn schema_examples_behave_as_named() {
    let schemas = SchemaRegistry::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/examples");
    let mut checked = 0;
    for kind in DefinitionKind::ALL {
        let dir = root.join(kind.schema_name());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let json: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            if name.starts_with("valid-") {
                if let Err(problems) = Definition::parse(&schemas, kind, &json, false) {
                    panic!("{name} should be valid: {problems:?}");
                }
            } else if name.starts_with("invalid-") {
                let problems =
                    Definition::parse(&schemas, kind, &json["document"], false).expect_err(&name);
                let mut pointers: Vec<String> =
                    problems.iter().map(|p| p.pointer.clone()).collect();
                pointers.sort();
                pointers.dedup();
                let expected: Vec<String> =
                    serde_json::from_value(json["expectedPointers"].clone()).unwrap();
                assert_eq!(pointers, expected, "{name}: {problems:?}");
            } else {
                panic!("{name}: example names start with valid- or invalid-");
            }
            checked += 1;
        }
    }
    assert!(checked >= 16, "only {checked} examples found");
}

/// The OpenAPI document describes each definition kind by hand; it must name exactly the fields
/// of the kind's JSON Schema, so neither can change without the other.
#[test]
fn openapi_documents_every_schema_field() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let openapi: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("docs/openapi.json")).unwrap())
            .unwrap();
    for (schema, component) in [
        ("listener", "ListenerDefinition"),
        ("sentinel", "SentinelDefinition"),
        ("route", "RouteDefinition"),
        ("downstream", "DownstreamDefinition"),
    ] {
        let schema: Value = serde_json::from_str(
            &std::fs::read_to_string(root.join(format!("schemas/{schema}.json"))).unwrap(),
        )
        .unwrap();
        let fields = |v: &Value| -> Vec<String> {
            let mut names: Vec<String> = v["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("properties in {v}"))
                .keys()
                .cloned()
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            fields(&openapi["components"]["schemas"][component]),
            fields(&schema),
            "docs/openapi.json {component} vs schemas/{schema}.json"
        );
    }
}
