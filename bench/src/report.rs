//! The result table every benchmark contributes rows to, printed once at the end.

use std::fmt::Write as _;

/// One line of the result table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Benchmark name, e.g. `planner`.
    pub bench: String,
    /// What was measured, with the parameters that make the number interpretable.
    pub params: String,
    /// The measured value, formatted.
    pub result: String,
    /// Unit of `result`.
    pub unit: String,
    /// The goal as text (`-` when none is stated).
    pub goal: String,
    /// `Some(false)` when a stated goal was missed, `None` when there is no goal.
    pub pass: Option<bool>,
}

impl Row {
    /// A row without a goal (informational).
    pub fn info(
        bench: &str,
        params: impl Into<String>,
        result: impl Into<String>,
        unit: &str,
    ) -> Self {
        Self {
            bench: bench.to_owned(),
            params: params.into(),
            result: result.into(),
            unit: unit.to_owned(),
            goal: "-".to_owned(),
            pass: None,
        }
    }

    /// A row checked against a goal.
    pub fn goal(
        bench: &str,
        params: impl Into<String>,
        result: impl Into<String>,
        unit: &str,
        goal: impl Into<String>,
        pass: bool,
    ) -> Self {
        Self {
            goal: goal.into(),
            pass: Some(pass),
            ..Self::info(bench, params, result, unit)
        }
    }

    /// A benchmark that could not run: shows the error and counts as a missed goal.
    pub fn failed(bench: &str, error: &anyhow::Error) -> Self {
        let mut message = format!("{error:#}");
        message.truncate(160);
        Self::goal(bench, format!("ERROR: {message}"), "-", "-", "runs", false)
    }
}

/// The closing lines of a run and whether it passed. It passes when it measured something,
/// every selected benchmark contributed a row (`silent` names those that did not) and no
/// stated goal was missed: a benchmark that was selected but never ran (a dropped
/// selection) must not end in "all stated goals met".
pub fn verdict(rows: &[Row], silent: &[String]) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    if rows.is_empty() {
        lines.push(
            "ERROR: no benchmark produced a result, so no goal was checked (see --only and \
             the messages above)"
                .to_owned(),
        );
    } else if !silent.is_empty() {
        lines.push(format!(
            "ERROR: selected but produced no result, so their goals were not checked: {}",
            silent.join(", ")
        ));
    }
    let missed = rows.iter().filter(|r| r.pass == Some(false)).count();
    if missed > 0 {
        lines.push(format!("{missed} goal(s) MISSED"));
    }
    let passed = lines.is_empty();
    if passed {
        lines.push("all stated goals met".to_owned());
    }
    (lines, passed)
}

/// The median (upper median for an even count); NaN for none.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Formats a float with a precision that suits its magnitude.
pub fn num(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders the rows as one aligned, pipe-separated table (Markdown-compatible).
pub fn render(rows: &[Row]) -> String {
    let header = ["benchmark", "params", "result", "unit", "goal"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let goal = match r.pass {
                Some(false) => format!("{} MISSED", r.goal),
                Some(true) => format!("{} ok", r.goal),
                None => r.goal.clone(),
            };
            [
                r.bench.clone(),
                r.params.clone(),
                r.result.clone(),
                r.unit.clone(),
                goal,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for c in &cells {
        for (w, s) in widths.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: [&str; 5]| {
        let mut s = String::from("|");
        for (i, (w, v)) in widths.iter().zip(c).enumerate() {
            // Results are numbers: right-align them.
            if i == 2 {
                let _ = write!(s, " {v:>w$} |");
            } else {
                let _ = write!(s, " {v:<w$} |");
            }
        }
        s
    };
    let mut out = line(header);
    out.push('\n');
    let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line([&sep[0], &sep[1], &sep[2], &sep[3], &sep[4]]));
    out.push('\n');
    for c in &cells {
        out.push_str(&line([&c[0], &c[1], &c[2], &c[3], &c[4]]));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_aligned_and_marks_goals() {
        let rows = vec![
            Row::info("a", "p", "1", "ms"),
            Row::goal("longer name", "params", "12345", "bytes", "< 2", false),
            Row::goal("b", "q", "0.5", "ms", "< 1", true),
        ];
        let out = render(&rows);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5);
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width), "{out}");
        assert!(lines[3].contains("< 2 MISSED"));
        assert!(lines[4].contains("< 1 ok"));
        assert!(
            lines[2].contains("|      1 |"),
            "results are right-aligned: {out}"
        );
    }

    #[test]
    fn a_run_passes_only_when_something_was_measured_and_met() {
        let ok = Row::goal("a", "p", "1", "ms", "< 2", true);
        let info = Row::info("b", "p", "1", "ms");
        let missed = Row::goal("c", "p", "3", "ms", "< 2", false);
        let silent = ["failover".to_owned()];
        let cases: &[(&[Row], &[String], bool, &str)] = &[
            (&[], &[], false, "no benchmark produced a result"),
            (&[], &silent, false, "no benchmark produced a result"),
            (
                std::slice::from_ref(&ok),
                &silent,
                false,
                "selected but produced no result, so their goals were not checked: failover",
            ),
            (
                &[ok.clone(), missed.clone()],
                &[],
                false,
                "1 goal(s) MISSED",
            ),
            (
                &[ok.clone(), info.clone()],
                &[],
                true,
                "all stated goals met",
            ),
            (&[info], &[], true, "all stated goals met"),
        ];
        for (rows, silent, pass, line) in cases {
            let (lines, passed) = verdict(rows, silent);
            assert_eq!(passed, *pass, "{lines:?}");
            assert!(lines.iter().any(|l| l.contains(line)), "{lines:?}");
        }
        let (lines, _) = verdict(&[missed], &silent);
        assert_eq!(lines.len(), 2, "both failures are named: {lines:?}");
    }

    #[test]
    fn num_precision_follows_magnitude() {
        assert_eq!(num(1234.56), "1235");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1.2345), "1.23");
    }
}
