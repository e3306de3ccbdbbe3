//! Plain-text tables for people, and colour: only when stdout is a terminal, and never
//! when `NO_COLOR` is set (<https://no-color.org>) or `TERM=dumb`.

use std::io::IsTerminal;

/// Whether output to stdout may be coloured.
pub fn colour_enabled() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var("TERM").map_or(true, |t| t != "dumb")
        && std::io::stdout().is_terminal()
}

/// A colour for a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tone {
    /// No colour.
    Plain,
    /// Green: success.
    Good,
    /// Red: failure.
    Bad,
    /// Yellow: revoked, expired.
    Warn,
    /// Cyan: still going.
    Busy,
    /// Bold: headers.
    Strong,
}

impl Tone {
    fn ansi(self) -> Option<&'static str> {
        match self {
            Tone::Plain => None,
            Tone::Good => Some("32"),
            Tone::Bad => Some("31"),
            Tone::Warn => Some("33"),
            Tone::Busy => Some("36"),
            Tone::Strong => Some("1"),
        }
    }
}

/// `text` in `tone` when `colour`.
pub fn paint(text: &str, tone: Tone, colour: bool) -> String {
    match (colour, tone.ansi()) {
        (true, Some(code)) => format!("\x1b[{code}m{text}\x1b[0m"),
        _ => text.to_string(),
    }
}

/// The tone of a host or job state name.
pub fn state_tone(state: &str) -> Tone {
    match state {
        "success" | "succeeded" | "ok" => Tone::Good,
        "failed" => Tone::Bad,
        "revoked" | "expired" => Tone::Warn,
        "pending" | "ready" | "reserved" | "running" => Tone::Busy,
        _ => Tone::Plain,
    }
}

/// A table: a header row and rows of cells, each cell with its tone.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<(String, Tone)>>,
}

/// Longest cell shown; longer ones end in `…`.
pub const MAX_CELL: usize = 60;

fn clip(s: &str) -> String {
    let one_line: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if one_line.chars().count() <= MAX_CELL {
        one_line
    } else {
        let mut cut: String = one_line.chars().take(MAX_CELL - 1).collect();
        cut.push('…');
        cut
    }
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Table {
        Table { header: header.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    /// Adds a row of plain cells.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.into_iter().map(|c| (clip(&c), Tone::Plain)).collect());
    }

    /// Adds a row whose cells have tones.
    pub fn toned_row(&mut self, cells: Vec<(String, Tone)>) {
        self.rows.push(cells.into_iter().map(|(c, t)| (clip(&c), t)).collect());
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, columns padded to their widest cell, two spaces apart.
    pub fn render(&self, colour: bool) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, (cell, _)) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |cells: Vec<(&str, Tone)>, out: &mut String| {
            let last = cells.len().saturating_sub(1);
            for (i, (cell, tone)) in cells.into_iter().enumerate() {
                let pad = if i == last { 0 } else { widths[i] - cell.chars().count() + 2 };
                out.push_str(&paint(cell, tone, colour));
                out.push_str(&" ".repeat(pad));
            }
            out.push('\n');
        };
        line(self.header.iter().map(|h| (h.as_str(), Tone::Strong)).collect(), &mut out);
        for row in &self.rows {
            line(row.iter().take(columns).map(|(c, t)| (c.as_str(), *t)).collect(), &mut out);
        }
        out
    }
}

/// How long ago `ms` (Unix milliseconds) was, in the largest whole unit: `12s ago`, `3m ago`.
pub fn ago(ms: i64, now_ms: i64) -> String {
    let secs = (now_ms - ms).max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_colour_is_optional() {
        let mut t = Table::new(&["HOST", "STATE"]);
        t.toned_row(vec![("web-01".into(), Tone::Plain), ("success".into(), Tone::Good)]);
        t.row(vec!["a".into(), "failed".into()]);
        assert_eq!(t.render(false), "HOST    STATE\nweb-01  success\na       failed\n");
        assert!(t.render(true).contains("\x1b[32msuccess\x1b[0m"));
        assert_eq!(clip(&"x".repeat(100)).chars().count(), MAX_CELL);
        assert_eq!(clip("a\nb"), "a b");
        assert_eq!(ago(0, 125_000), "2m ago");
    }
}
