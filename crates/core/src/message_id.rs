//! Message ids for acknowledged delivery. A device on an acknowledging listener names each message
//! (a string or an integer found in the body), or, on text and binary listeners where the body has
//! no structure, the connection numbers its data frames 1, 2, 3, ... The id is what the device
//! hears back in its acknowledgement or refusal, and, for ids the device chose, what the telemetry
//! store de-duplicates retries by (together with the device id).

use serde::ser::Serializer;
use serde::Serialize;
use serde_json::Value;

/// Longest id a device may choose, in characters (the same bound for its decimal form when the id
/// is an integer).
pub const MAX_MESSAGE_ID_CHARS: usize = 128;

/// The id of one acknowledged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageId {
    /// A string id from the body.
    Text(Box<str>),
    /// An integer id from the body, kept as the JSON number it was so the acknowledgement repeats
    /// it in the same form.
    Integer(serde_json::Number),
    /// The data frame's number on its connection (text and binary listeners). Frame numbers start
    /// again on every connection, so they are never used to de-duplicate.
    Frame(u64),
}

/// Why a body value cannot be a message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidMessageId {
    /// Not a string or an integer.
    WrongType,
    /// An empty string.
    Empty,
    /// Longer than [`MAX_MESSAGE_ID_CHARS`].
    TooLong,
}

impl std::fmt::Display for InvalidMessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvalidMessageId::WrongType => {
                f.write_str("the message id must be a string or an integer")
            }
            InvalidMessageId::Empty => f.write_str("the message id must not be empty"),
            InvalidMessageId::TooLong => write!(
                f,
                "the message id must be at most {MAX_MESSAGE_ID_CHARS} characters long"
            ),
        }
    }
}

impl MessageId {
    /// Reads an id the device put in its message.
    pub fn from_json(value: &Value) -> Result<Self, InvalidMessageId> {
        match value {
            Value::String(text) if text.is_empty() => Err(InvalidMessageId::Empty),
            Value::String(text) if text.chars().count() > MAX_MESSAGE_ID_CHARS => {
                Err(InvalidMessageId::TooLong)
            }
            Value::String(text) => Ok(MessageId::Text(text.as_str().into())),
            // Integers only: a float id would not survive a round trip through every client.
            Value::Number(number) if number.is_i64() || number.is_u64() => {
                Ok(MessageId::Integer(number.clone()))
            }
            _ => Err(InvalidMessageId::WrongType),
        }
    }

    /// The id as the telemetry store keeps it for de-duplication, or `None` for frame numbers,
    /// which are not stable across connections. Strings and integers share one text space, so
    /// `"17"` and `17` name the same message.
    pub fn dedup_key(&self) -> Option<String> {
        match self {
            MessageId::Text(text) => Some(text.to_string()),
            MessageId::Integer(number) => Some(number.to_string()),
            MessageId::Frame(_) => None,
        }
    }

    /// True for frame numbers, whose acknowledgements are cumulative.
    pub fn is_frame(&self) -> bool {
        matches!(self, MessageId::Frame(_))
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            MessageId::Text(text) => serializer.serialize_str(text),
            MessageId::Integer(number) => number.serialize(serializer),
            MessageId::Frame(number) => serializer.serialize_u64(*number),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_and_integers_are_ids_and_keep_their_form() {
        let text = MessageId::from_json(&json!("m-17")).unwrap();
        assert_eq!(serde_json::to_value(&text).unwrap(), json!("m-17"));
        let number = MessageId::from_json(&json!(17)).unwrap();
        assert_eq!(serde_json::to_value(&number).unwrap(), json!(17));
        assert_eq!(number.dedup_key().as_deref(), Some("17"));
        let big = MessageId::from_json(&json!(u64::MAX)).unwrap();
        assert_eq!(big.dedup_key(), Some(u64::MAX.to_string()));
        assert_eq!(MessageId::Frame(3).dedup_key(), None);
    }

    #[test]
    fn other_values_are_refused_with_a_reason() {
        assert_eq!(
            MessageId::from_json(&json!(1.5)),
            Err(InvalidMessageId::WrongType)
        );
        assert_eq!(
            MessageId::from_json(&json!({"id": 1})),
            Err(InvalidMessageId::WrongType)
        );
        assert_eq!(
            MessageId::from_json(&json!("")),
            Err(InvalidMessageId::Empty)
        );
        let long = "é".repeat(MAX_MESSAGE_ID_CHARS + 1);
        assert_eq!(
            MessageId::from_json(&json!(long)),
            Err(InvalidMessageId::TooLong)
        );
        let longest = "é".repeat(MAX_MESSAGE_ID_CHARS);
        assert!(MessageId::from_json(&json!(longest)).is_ok());
    }
}
