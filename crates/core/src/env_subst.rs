//! `${NAME}` in header values: resolved from the environment when the module starts, so a
//! token can live in the server's environment instead of in a stored definition. `$${` stands
//! for a literal `${`. A name is `[A-Za-z_][A-Za-z0-9_]*`.

/// Why a value could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubstitutionError {
    /// `${NAME}` names a variable that is not set.
    Unset(String),
    /// `${` without a valid name and closing brace.
    Malformed,
}

impl std::fmt::Display for SubstitutionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubstitutionError::Unset(name) => {
                write!(f, "the environment variable {name} is not set")
            }
            SubstitutionError::Malformed => f.write_str(
                "${ must be followed by a variable name and } (write $${ for a literal ${)",
            ),
        }
    }
}

/// Replaces every `${NAME}` in `value` with `lookup(NAME)`.
pub fn substitute(
    value: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, SubstitutionError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(literal) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = literal;
        } else if let Some(open) = after.strip_prefix("${") {
            let end = open.find('}').ok_or(SubstitutionError::Malformed)?;
            let name = &open[..end];
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(SubstitutionError::Malformed);
            }
            out.push_str(&lookup(name).ok_or_else(|| SubstitutionError::Unset(name.to_owned()))?);
            rest = &open[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// [`substitute`] against the process environment.
pub fn substitute_env(value: &str) -> Result<String, SubstitutionError> {
    substitute(value, |name| std::env::var(name).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cret".to_owned())
    }

    #[test]
    fn variables_are_replaced_and_escapes_kept() {
        assert_eq!(substitute("Bearer ${TOKEN}", env).unwrap(), "Bearer s3cret");
        assert_eq!(substitute("a$b $$x", env).unwrap(), "a$b $$x");
        assert_eq!(substitute("$${TOKEN}", env).unwrap(), "${TOKEN}");
        assert_eq!(substitute("${TOKEN}${TOKEN}", env).unwrap(), "s3crets3cret");
    }

    #[test]
    fn unset_and_malformed_say_so() {
        assert_eq!(
            substitute("${NOPE}", env),
            Err(SubstitutionError::Unset("NOPE".into()))
        );
        assert_eq!(substitute("${1X}", env), Err(SubstitutionError::Malformed));
        assert_eq!(
            substitute("${TOKEN", env),
            Err(SubstitutionError::Malformed)
        );
    }
}
