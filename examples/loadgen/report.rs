//! The result table: one row per figure, with its same-run baseline, the
//! ratio, the target and whether it was met; printed and written as JSON.

use serde_json::{json, Value};

/// How a figure is judged.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// Informational, no target.
    None,
    /// value >= x
    AtLeast(f64),
    /// value < x
    Below(f64),
    /// value <= x
    AtMost(f64),
    /// value / baseline >= x
    RatioAtLeast(f64),
    /// value == x (counts, codes)
    Equals(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unit {
    PerSec,
    MBps,
    Millis,
    Secs,
    Micros,
    MB,
    KiB,
    Count,
    Percent,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub figure: String,
    pub value: Option<f64>,
    pub unit: Unit,
    pub baseline: Option<f64>,
    pub target: Target,
    /// Extra checks folded into pass/fail (e.g. "every subscriber got every event").
    pub also: Option<bool>,
    pub note: String,
}

impl Row {
    pub fn new(scenario: &str, figure: &str, value: f64, unit: Unit, target: Target) -> Row {
        Row {
            scenario: scenario.to_string(),
            figure: figure.to_string(),
            value: Some(value),
            unit,
            baseline: None,
            target,
            also: None,
            note: String::new(),
        }
    }

    pub fn unavailable(scenario: &str, why: &str) -> Row {
        Row {
            scenario: scenario.to_string(),
            figure: "unavailable".to_string(),
            value: None,
            unit: Unit::Count,
            baseline: None,
            target: Target::None,
            also: None,
            note: why.to_string(),
        }
    }

    pub fn baseline(mut self, b: f64) -> Row {
        self.baseline = Some(b);
        self
    }

    pub fn also(mut self, ok: bool) -> Row {
        self.also = Some(ok);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        match (self.value, self.baseline) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        }
    }

    /// `None` when there is nothing to judge (no target, or no value).
    pub fn pass(&self) -> Option<bool> {
        let Some(v) = self.value else {
            // No figure: an error row (also = false) fails, "unavailable" is not judged.
            return self.also.filter(|ok| !ok);
        };
        let judged = match self.target {
            Target::None => None,
            Target::AtLeast(x) => Some(v >= x),
            Target::Below(x) => Some(v < x),
            Target::AtMost(x) => Some(v <= x),
            Target::Equals(x) => Some(v == x),
            Target::RatioAtLeast(x) => Some(self.ratio().is_some_and(|r| r >= x)),
        };
        match (judged, self.also) {
            (Some(a), Some(b)) => Some(a && b),
            (j, None) => j,
            (None, b) => b,
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::None => String::new(),
            Target::AtLeast(x) => format!(">= {}", fmt(x, self.unit)),
            Target::Below(x) => format!("< {}", fmt(x, self.unit)),
            Target::AtMost(x) => format!("<= {}", fmt(x, self.unit)),
            Target::Equals(x) => format!("= {}", fmt(x, self.unit)),
            Target::RatioAtLeast(x) => format!(">= {:.0}% of baseline", x * 100.0),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "figure": self.figure,
            "value": self.value,
            "unit": unit_name(self.unit),
            "baseline": self.baseline,
            "ratio": self.ratio(),
            "target": self.target_text(),
            "pass": self.pass(),
            "note": self.note,
        })
    }
}

fn unit_name(u: Unit) -> &'static str {
    match u {
        Unit::PerSec => "1/s",
        Unit::MBps => "MB/s",
        Unit::Millis => "ms",
        Unit::Secs => "s",
        Unit::Micros => "us",
        Unit::MB => "MB",
        Unit::KiB => "KiB",
        Unit::Count => "count",
        Unit::Percent => "%",
    }
}

/// `1234567.0` -> `1,234,567`
fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

pub fn fmt(v: f64, unit: Unit) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    match unit {
        Unit::PerSec => format!("{}/s", thousands(v)),
        Unit::MBps => format!("{v:.1} MB/s"),
        Unit::Millis if v < 0.1 => format!("{v:.3} ms"),
        Unit::Millis if v < 10.0 => format!("{v:.2} ms"),
        Unit::Millis => format!("{v:.1} ms"),
        Unit::Secs => format!("{v:.2} s"),
        Unit::Micros => format!("{v:.1} us"),
        Unit::MB => format!("{v:.1} MB"),
        Unit::KiB => format!("{v:.1} KiB"),
        Unit::Count => thousands(v),
        Unit::Percent => format!("{v:.2}%"),
    }
}

fn ratio_text(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.0}x")
    } else {
        format!("{:.0}%", x * 100.0)
    }
}

/// The table as Markdown (it reads as a plain table in a terminal too).
pub fn table(rows: &[Row]) -> String {
    let header = [
        "scenario", "figure", "value", "baseline", "ratio", "target", "result",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let result = match (r.value, r.pass()) {
                (None, Some(false)) => "ERROR".to_string(),
                (None, _) => "unavailable".to_string(),
                (_, None) => String::new(),
                (_, Some(true)) => "pass".to_string(),
                (_, Some(false)) => "FAIL".to_string(),
            };
            let value = match r.value {
                Some(v) => fmt(v, r.unit),
                None => r.note.clone(),
            };
            [
                r.scenario.clone(),
                r.figure.clone(),
                value,
                r.baseline.map(|b| fmt(b, r.unit)).unwrap_or_default(),
                r.ratio().map(ratio_text).unwrap_or_default(),
                r.target_text(),
                result,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::from("|");
        for (c, w) in cols.iter().zip(widths) {
            s.push_str(&format!(" {c:<w$} |"));
        }
        s.push('\n');
        s
    };
    let mut out = line(&header.map(String::from));
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    for row in &cells {
        out.push_str(&line(row));
    }
    let notes: Vec<String> = rows
        .iter()
        .filter(|r| r.value.is_some() && !r.note.is_empty())
        .map(|r| format!("- {} / {}: {}", r.scenario, r.figure, r.note))
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes.join("\n"));
        out.push('\n');
    }
    out
}
