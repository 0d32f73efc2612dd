//! Filter expressions (`-E`): which tests run, by name and tag, in the spirit
//! of nextest's filtersets.
//!
//! ```text
//! expr    := or
//! or      := and (("or" | "|") and)*
//! and     := not (("and" | "&") not)*
//! not     := ("not" | "!") not | atom
//! atom    := "(" expr ")" | "all()" | "none()"
//!          | "test(" pattern ")" | "tag(" pattern ")"
//! pattern := NAME (contains) | "=" NAME (equals) | "~" NAME (contains)
//! ```
//!
//! `test(slow)` matches every test whose name contains `slow`, `test(=slow)`
//! only the test named `slow`; `tag(exec)` every test with the tag `exec`,
//! `tag(~ex)` every test with a tag that contains `ex`.

use std::fmt;

use crate::host::TestCase;

/// A parsed filter expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterExpr {
    /// Every test.
    All,
    /// No test.
    None,
    /// Tests whose name matches.
    Test(Pattern),
    /// Tests with a tag that matches.
    Tag(Pattern),
    /// Tests the inner expression does not match.
    Not(Box<FilterExpr>),
    /// Tests both match.
    And(Box<FilterExpr>, Box<FilterExpr>),
    /// Tests either matches.
    Or(Box<FilterExpr>, Box<FilterExpr>),
}

/// How a name or tag is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// The whole text equals this.
    Equals(String),
    /// The text contains this.
    Contains(String),
}

impl Pattern {
    fn matches(&self, text: &str) -> bool {
        match self {
            Pattern::Equals(p) => text == p,
            Pattern::Contains(p) => text.contains(p.as_str()),
        }
    }
}

impl FilterExpr {
    /// True when `case` is selected.
    pub fn matches(&self, case: &TestCase) -> bool {
        match self {
            FilterExpr::All => true,
            FilterExpr::None => false,
            FilterExpr::Test(p) => p.matches(&case.name),
            FilterExpr::Tag(p) => case.tags.iter().any(|t| p.matches(t)),
            FilterExpr::Not(e) => !e.matches(case),
            FilterExpr::And(a, b) => a.matches(case) && b.matches(case),
            FilterExpr::Or(a, b) => a.matches(case) || b.matches(case),
        }
    }

    /// Parses `text`; the error says where and what was expected.
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        let tokens = tokenize(text)?;
        let end = text.chars().count();
        let mut parser = Parser { tokens, at: 0, end };
        let expr = parser.or()?;
        match parser.tokens.get(parser.at) {
            None => Ok(expr),
            Some((at, token)) => Err(FilterError::new(
                *at,
                format!("expected `and`, `or` or the end, found {token}"),
            )),
        }
    }
}

/// A filter expression that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at character {at}: {message}")]
pub struct FilterError {
    /// Character offset in the expression, from 0.
    pub at: usize,
    /// What was wrong.
    pub message: String,
}

impl FilterError {
    fn new(at: usize, message: String) -> Self {
        Self { at, message }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Open,
    Close,
    And,
    Or,
    Not,
    /// `name(argument)`: a matcher with its argument, verbatim.
    Call(String, String),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Open => f.write_str("`(`"),
            Token::Close => f.write_str("`)`"),
            Token::And => f.write_str("`and`"),
            Token::Or => f.write_str("`or`"),
            Token::Not => f.write_str("`not`"),
            Token::Call(name, arg) => write!(f, "`{name}({arg})`"),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<(usize, Token)>, FilterError> {
    let chars: Vec<(usize, char)> = text.chars().enumerate().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' | ')' | '&' | '|' | '!' => {
                let token = match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    '&' => Token::And,
                    '|' => Token::Or,
                    _ => Token::Not,
                };
                tokens.push((at, token));
                i += 1;
            }
            c if c.is_alphabetic() => {
                let start = i;
                while i < chars.len() && (chars[i].1.is_alphanumeric() || chars[i].1 == '_') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().map(|(_, c)| c).collect();
                match word.as_str() {
                    "and" => tokens.push((at, Token::And)),
                    "or" => tokens.push((at, Token::Or)),
                    "not" => tokens.push((at, Token::Not)),
                    _ if i < chars.len() && chars[i].1 == '(' => {
                        // The argument runs to the matching `)`; names may hold anything else.
                        let arg_start = i + 1;
                        let close = chars[arg_start..]
                            .iter()
                            .position(|(_, c)| *c == ')')
                            .map(|p| arg_start + p)
                            .ok_or_else(|| {
                                FilterError::new(at, format!("`{word}(` has no closing `)`"))
                            })?;
                        let arg: String = chars[arg_start..close].iter().map(|(_, c)| c).collect();
                        tokens.push((at, Token::Call(word, arg.trim().to_string())));
                        i = close + 1;
                    }
                    _ => {
                        return Err(FilterError::new(
                            at,
                            format!(
                                "unknown word `{word}`: expected test(..), tag(..), all(), none(), \
                                 and, or, not"
                            ),
                        ));
                    }
                }
            }
            c => {
                return Err(FilterError::new(at, format!("unexpected `{c}`")));
            }
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    at: usize,
    /// Characters in the expression: where an error at its end is.
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.at).map_or(self.end, |(at, _)| *at)
    }

    fn or(&mut self) -> Result<FilterExpr, FilterError> {
        let mut left = self.and()?;
        while self.peek() == Some(&Token::Or) {
            self.at += 1;
            let right = self.and()?;
            left = FilterExpr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<FilterExpr, FilterError> {
        let mut left = self.not()?;
        while self.peek() == Some(&Token::And) {
            self.at += 1;
            let right = self.not()?;
            left = FilterExpr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<FilterExpr, FilterError> {
        if self.peek() == Some(&Token::Not) {
            self.at += 1;
            return Ok(FilterExpr::Not(Box::new(self.not()?)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<FilterExpr, FilterError> {
        let at = self.offset();
        let Some((_, token)) = self.tokens.get(self.at).cloned() else {
            return Err(FilterError::new(
                at,
                "the expression ends where a test(..), tag(..) or `(` was expected".into(),
            ));
        };
        self.at += 1;
        match token {
            Token::Open => {
                let inner = self.or()?;
                if self.peek() != Some(&Token::Close) {
                    return Err(FilterError::new(self.offset(), "expected `)`".into()));
                }
                self.at += 1;
                Ok(inner)
            }
            Token::Call(name, arg) => call(at, &name, &arg),
            other => Err(FilterError::new(
                at,
                format!("expected test(..), tag(..) or `(`, found {other}"),
            )),
        }
    }
}

fn call(at: usize, name: &str, arg: &str) -> Result<FilterExpr, FilterError> {
    let pattern = || -> Result<Pattern, FilterError> {
        let pattern = if let Some(exact) = arg.strip_prefix('=') {
            Pattern::Equals(exact.to_string())
        } else {
            Pattern::Contains(arg.strip_prefix('~').unwrap_or(arg).to_string())
        };
        match &pattern {
            Pattern::Equals(p) | Pattern::Contains(p) if p.is_empty() => Err(FilterError::new(
                at,
                format!("`{name}()` needs a name, e.g. {name}(exec)"),
            )),
            _ => Ok(pattern),
        }
    };
    match (name, arg) {
        ("all", "") => Ok(FilterExpr::All),
        ("none", "") => Ok(FilterExpr::None),
        ("test", _) => Ok(FilterExpr::Test(pattern()?)),
        ("tag", _) => Ok(FilterExpr::Tag(pattern()?)),
        _ => Err(FilterError::new(
            at,
            format!("unknown matcher `{name}({arg})`: expected test(..), tag(..), all() or none()"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    fn case(name: &str, tags: &[&'static str]) -> TestCase {
        TestCase {
            name: name.into(),
            ignored: false,
            timeout_ms: None,
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn selected(expr: &str) -> Vec<String> {
        let cases = [
            case("exec_uname", &["exec"]),
            case("exec_slow", &["exec", "slow"]),
            case("fs_read", &["fs"]),
            case("plain", &[]),
        ];
        let expr = FilterExpr::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        cases
            .iter()
            .filter(|c| expr.matches(c))
            .map(|c| c.name.clone())
            .collect()
    }

    #[rstest]
    #[case::tag("tag(exec)", &["exec_uname", "exec_slow"])]
    #[case::and_not("tag(exec) and not test(slow)", &["exec_uname"])]
    #[case::symbols("tag(exec) & !tag(slow) | test(=plain)", &["exec_uname", "plain"])]
    #[case::or_binds_looser("tag(fs) or tag(exec) and tag(slow)", &["exec_slow", "fs_read"])]
    #[case::parentheses("(tag(fs) or tag(exec)) and not tag(slow)", &["exec_uname", "fs_read"])]
    #[case::contains("test(read) or tag(~slo)", &["exec_slow", "fs_read"])]
    #[case::exact("test(=exec)", &[])]
    #[case::all_none("all() and not none()", &["exec_uname", "exec_slow", "fs_read", "plain"])]
    fn expressions_select(#[case] expr: &str, #[case] expected: &[&str]) {
        let mut got = selected(expr);
        got.sort();
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(got, expected, "{expr}");
    }

    #[rstest]
    #[case::unknown_word("tags(exec)", 0, "unknown matcher")]
    #[case::bare_word("exec", 0, "unknown word `exec`")]
    #[case::unclosed("test(a", 0, "has no closing")]
    #[case::dangling("tag(a) and", 10, "ends where")]
    #[case::missing_paren("(tag(a)", 7, "expected `)`")]
    #[case::empty_name("tag()", 0, "needs a name")]
    #[case::trailing("tag(a) tag(b)", 7, "expected `and`, `or` or the end")]
    #[case::stray("tag(a) $", 7, "unexpected `$`")]
    fn bad_expressions_say_where(#[case] expr: &str, #[case] at: usize, #[case] needle: &str) {
        let err = FilterExpr::parse(expr).expect_err(expr);
        assert_eq!(err.at, at, "{expr}: {err}");
        assert!(err.message.contains(needle), "{expr}: {err}");
    }
}
