//! The shell's backslash commands: parsed from text with `FromStr`, run by
//! [`super::Session::execute`], and described by the help text they generate (as in
//! datafusion-cli's `command.rs`).

use std::path::PathBuf;
use std::str::FromStr;

use crate::cli::display::Format;
use crate::error::HedfError;

/// One backslash command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    ListTables,
    Describe(String),
    /// Set timing on or off; `None` toggles it.
    Timing(Option<bool>),
    /// Set the output format; `None` shows it.
    Format(Option<Format>),
    Pivot,
    Include(PathBuf),
    Quit,
    Help,
}

impl Command {
    /// One of each command, in the order the help lists them.
    fn all() -> [Command; 8] {
        [
            Command::ListTables,
            Command::Describe(String::new()),
            Command::Timing(None),
            Command::Format(None),
            Command::Pivot,
            Command::Include(PathBuf::new()),
            Command::Quit,
            Command::Help,
        ]
    }

    /// How the command is written, and what it does.
    fn usage(&self) -> (&'static str, &'static str) {
        match self {
            Command::ListTables => ("\\d", "list tables"),
            Command::Describe(_) => (
                "\\d NAME",
                "describe a table: columns, which are encrypted, scale, key id",
            ),
            Command::Timing(_) => ("\\timing [on|off]", "show how long each statement takes"),
            Command::Format(_) => ("\\format FORMAT", "output as table, csv, json or pivot"),
            Command::Pivot => (
                "\\pivot",
                "toggle the pivot layout (group keys as an index, measures side by side)",
            ),
            Command::Include(_) => ("\\i FILE", "run the statements and commands in FILE"),
            Command::Quit => ("\\q", "quit (or Ctrl-D); Ctrl-C cancels a running query"),
            Command::Help => ("\\?", "this help"),
        }
    }

    /// The shell's help text, made from every command's usage.
    pub fn help() -> String {
        let mut text = String::from(
            "SQL statements end with ';' and may span lines. Encrypted columns are decrypted with the\n\
             loaded key; values of any other key show as <encrypted>.\n",
        );
        for command in Self::all() {
            let (syntax, what) = command.usage();
            text += &format!("  {syntax:<17}{what}\n");
        }
        text.pop();
        text
    }
}

impl FromStr for Command {
    type Err = HedfError;

    /// Parses a command without its backslash, e.g. `d population` or `timing on`.
    fn from_str(text: &str) -> Result<Self, HedfError> {
        let text = text.trim().trim_end_matches(';').trim();
        let (name, arg) = text
            .split_once(char::is_whitespace)
            .map_or((text, ""), |(n, a)| (n, a.trim()));
        let invalid = |why: String| Err(HedfError::Invalid(why));
        Ok(match (name, arg) {
            ("q" | "quit", _) => Command::Quit,
            ("?" | "h" | "help", _) => Command::Help,
            ("d", "") => Command::ListTables,
            ("d", table) => Command::Describe(table.to_string()),
            ("timing", "") => Command::Timing(None),
            ("timing", "on") => Command::Timing(Some(true)),
            ("timing", "off") => Command::Timing(Some(false)),
            ("timing", other) => return invalid(format!("\\timing {other}: expected on or off")),
            ("format", "") => Command::Format(None),
            ("format", arg) => match <Format as clap::ValueEnum>::from_str(arg, true) {
                Ok(format) => Command::Format(Some(format)),
                Err(_) => {
                    return invalid(format!(
                        "\\format {arg}: expected table, csv, json or pivot"
                    ))
                }
            },
            ("pivot", _) => Command::Pivot,
            ("i" | "include", "") => return invalid("\\i needs a file".into()),
            ("i" | "include", file) => Command::Include(PathBuf::from(file)),
            _ => return invalid(format!("unknown command \\{name}; \\? lists the commands")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_the_help_lists_each() {
        let parse = |t: &str| t.parse::<Command>().unwrap();
        assert_eq!(parse("d"), Command::ListTables);
        assert_eq!(
            parse("d population;"),
            Command::Describe("population".into())
        );
        assert_eq!(parse("timing on"), Command::Timing(Some(true)));
        assert_eq!(parse("timing"), Command::Timing(None));
        assert_eq!(parse("format CSV"), Command::Format(Some(Format::Csv)));
        assert_eq!(
            parse("i sql/by_sex.sql"),
            Command::Include("sql/by_sex.sql".into())
        );
        assert_eq!(parse("quit"), Command::Quit);
        for bad in ["timing maybe", "format xml", "i", "nope"] {
            assert!(bad.parse::<Command>().is_err(), "{bad}");
        }
        let help = Command::help();
        for command in Command::all() {
            assert!(help.contains(command.usage().0), "{help}");
        }
    }
}
