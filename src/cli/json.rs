//! `iotgate json`: reads one JSON document (an API answer) from standard input and prints it
//! indented, or only the value at a JSON Pointer, strings bare. It is what a script needs from
//! `jq` to keep a token or an access key (`KEY=$(curl ... | iotgate json /primaryAccessKey)`),
//! without requiring jq or Python on the machine. An `{"error": ...}` answer is reported as the
//! failure it is, so `KEY=$(...)` in a `set -e` script stops there instead of carrying on empty.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::Value;

/// Print an API answer read from standard input, or one value of it
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Reads one JSON document (an API answer) from standard input and prints it indented, or only the value at POINTER; a string is printed without quotes.",
    after_help = "Exit status: 1 when the input is not JSON, is an API error answer ({\"error\": ...}), or has nothing at POINTER."
)]
pub struct JsonArgs {
    /// JSON Pointer (RFC 6901) of the value to print, e.g. /primaryAccessKey or
    /// /items/0/payload; the whole document when left out.
    #[arg(value_parser = parse_pointer)]
    pub pointer: Option<String>,
}

fn parse_pointer(text: &str) -> Result<String, String> {
    if text.is_empty() || text.starts_with('/') {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "a JSON Pointer starts with / (did you mean /{text}?)"
        ))
    }
}

/// The text `iotgate json` prints for `document`, or why it prints nothing.
pub fn select(document: &str, pointer: Option<&str>) -> anyhow::Result<String> {
    anyhow::ensure!(
        !document.trim().is_empty(),
        "standard input is empty; expected a JSON document (an API answer)"
    );
    let value: Value = serde_json::from_str(document).with_context(|| {
        let start: String = document.trim().chars().take(120).collect();
        format!("standard input is not JSON (it starts with {start:?})")
    })?;
    if let Some(error) = value
        .as_object()
        .and_then(|o| o.get("error"))
        .filter(|_| value.as_object().is_some_and(|o| o.len() == 1))
    {
        anyhow::bail!("the answer is an error: {error}");
    }
    let selected = match pointer {
        None | Some("") => &value,
        Some(pointer) => value.pointer(pointer).with_context(|| {
            let fields = value
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            if fields.is_empty() {
                format!("nothing at {pointer} in the answer")
            } else {
                format!("nothing at {pointer} in the answer (its fields: {fields})")
            }
        })?,
    };
    Ok(match selected {
        Value::String(text) => text.clone(),
        other => serde_json::to_string_pretty(other)?,
    })
}

pub fn run(args: JsonArgs) -> anyhow::Result<ExitCode> {
    let mut document = String::new();
    std::io::stdin()
        .read_to_string(&mut document)
        .context("cannot read standard input")?;
    println!("{}", select(&document, args.pointer.as_deref())?);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::select;

    const DEVICE: &str =
        r#"{"deviceId":"thermo-1","primaryAccessKey":"k1","properties":{"floor":2},"tags":["a"]}"#;

    #[test]
    fn strings_print_bare_and_everything_else_as_json() {
        assert_eq!(select(DEVICE, Some("/primaryAccessKey")).unwrap(), "k1");
        assert_eq!(select(DEVICE, Some("/properties/floor")).unwrap(), "2");
        assert_eq!(select(DEVICE, Some("/tags")).unwrap(), "[\n  \"a\"\n]");
        assert!(select(DEVICE, None)
            .unwrap()
            .starts_with("{\n  \"deviceId\": \"thermo-1\""));
    }

    #[test]
    fn a_missing_value_names_the_fields_there_are() {
        let error = select(DEVICE, Some("/secondaryAccessKey"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("nothing at /secondaryAccessKey"), "{error}");
        assert!(error.contains("primaryAccessKey"), "{error}");
    }

    #[test]
    fn an_error_answer_is_a_failure_with_its_reason() {
        let answer = r#"{"error":{"code":"conflict","message":"device thermo-1 already exists"}}"#;
        let error = select(answer, Some("/primaryAccessKey"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("device thermo-1 already exists"), "{error}");
    }

    #[test]
    fn empty_and_non_json_input_are_named() {
        assert!(select("  \n", None)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let error = select("<html>502 Bad Gateway</html>", None)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("not JSON") && error.contains("502"),
            "{error}"
        );
    }
}
