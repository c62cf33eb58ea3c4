//! Finding places in recipes: which source line a rendered line came from (templates change
//! lines), and where in a YAML document a field path such as `disk.partitions[1].size` is written.
//! Pure functions over text; no I/O.

use super::diag::Pos;
use serde_saphyr::granit_parser::{Event, Parser};
use std::collections::BTreeMap;

/// Maps lines of the rendered recipe back to lines of its source.
#[derive(Debug, Clone)]
pub struct LineMap {
    /// For each rendered line (0-based): the source line (0-based) and whether it is unchanged.
    lines: Vec<(usize, bool)>,
}

impl LineMap {
    /// Align rendered text with its source line by line. Unchanged lines map exactly; lines made
    /// or changed by template code map to the source line that produced them.
    pub fn new(source: &str, rendered: &str) -> Self {
        use similar::{DiffOp, TextDiff};
        let diff = TextDiff::configure()
            .algorithm(similar::Algorithm::Myers)
            .diff_lines(source, rendered);
        let mut lines = Vec::new();
        for op in diff.ops() {
            match *op {
                DiffOp::Equal {
                    old_index,
                    new_index: _,
                    len,
                } => {
                    for i in 0..len {
                        lines.push((old_index + i, true));
                    }
                }
                DiffOp::Delete { .. } => {}
                DiffOp::Insert {
                    old_index, new_len, ..
                } => {
                    // Lines produced by an include or loop: point at the source line before them
                    // (the tag that made them sits there or just above).
                    let at = old_index.saturating_sub(1);
                    for _ in 0..new_len {
                        lines.push((at, false));
                    }
                }
                DiffOp::Replace {
                    old_index,
                    old_len,
                    new_len,
                    ..
                } => {
                    for i in 0..new_len {
                        lines.push((old_index + i.min(old_len.saturating_sub(1)), false));
                    }
                }
            }
        }
        LineMap { lines }
    }

    /// Source line (1-based) for a rendered line (1-based), and whether the line is unchanged.
    pub fn source_line(&self, rendered_line: usize) -> (usize, bool) {
        match self.lines.get(rendered_line.saturating_sub(1)) {
            Some(&(line, same)) => (line + 1, same),
            None => (self.lines.last().map(|l| l.0 + 1).unwrap_or(1), false),
        }
    }
}

/// Where each field path of a YAML document is written (the key for mapping entries, the node
/// for sequence items). Paths look like `disk.partitions[1].size`.
#[derive(Debug, Clone, Default)]
pub struct PathIndex {
    places: BTreeMap<String, Pos>,
}

enum Frame {
    Map { key: Option<String>, path: String },
    Seq { index: usize, path: String },
}

impl PathIndex {
    /// Index a YAML document. Text that does not parse gives a partial index (the parse error
    /// itself is reported by the deserializer).
    pub fn new(text: &str) -> Self {
        let mut places = BTreeMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        while let Some(Ok((event, span))) = parser.next_event() {
            let pos = Pos {
                line: span.start.line(),
                column: span.start.col() + 1,
            };
            let is_node = matches!(
                event,
                Event::Scalar(..)
                    | Event::MappingStart(..)
                    | Event::SequenceStart(..)
                    | Event::Alias(..)
            );
            if is_node {
                // Is this node a key, or a value at some path?
                let mut node_path = None;
                match stack.last_mut() {
                    Some(Frame::Map { key, path }) => {
                        if key.is_none() {
                            let name = match &event {
                                Event::Scalar(value, ..) => value.to_string(),
                                _ => String::from("?"),
                            };
                            let full = join_key(path, &name);
                            places.entry(full).or_insert(pos);
                            *key = Some(name);
                            if !matches!(event, Event::Scalar(..)) {
                                // Complex keys: skip their contents below.
                                node_path = Some(String::from("\0complex-key"));
                            } else {
                                continue;
                            }
                        } else if let Some(k) = key.take() {
                            node_path = Some(join_key(path, &k));
                        }
                    }
                    Some(Frame::Seq { index, path }) => {
                        let full = format!("{path}[{index}]");
                        *index += 1;
                        places.entry(full.clone()).or_insert(pos);
                        node_path = Some(full);
                    }
                    None => node_path = Some(String::new()),
                }
                let node_path = node_path.unwrap_or_default();
                match event {
                    Event::MappingStart(..) => stack.push(Frame::Map {
                        key: None,
                        path: node_path,
                    }),
                    Event::SequenceStart(..) => stack.push(Frame::Seq {
                        index: 0,
                        path: node_path,
                    }),
                    _ => {}
                }
                continue;
            }
            match event {
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                Event::StreamEnd => break,
                _ => {}
            }
        }
        PathIndex { places }
    }

    /// The place of `path`, or of its closest written ancestor.
    pub fn find(&self, path: &str) -> Option<Pos> {
        let mut p = path.to_string();
        loop {
            if let Some(pos) = self.places.get(&p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }

    /// Whether `path` itself is written in this document.
    pub fn contains(&self, path: &str) -> bool {
        self.places.contains_key(path)
    }
}

fn join_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_nested_paths() {
        let text = "name: x\ndisk:\n  partitions:\n    - name: esp\n      size: 1M\n    - name: root\n      size: rest\n";
        let idx = PathIndex::new(text);
        assert_eq!(idx.find("name"), Some(Pos { line: 1, column: 1 }));
        assert_eq!(
            idx.find("disk.partitions[1].size"),
            Some(Pos { line: 7, column: 7 })
        );
        assert_eq!(
            idx.find("disk.partitions[1]"),
            Some(Pos { line: 6, column: 7 })
        );
        // Unwritten paths fall back to the nearest ancestor.
        assert_eq!(
            idx.find("disk.partitions[0].label"),
            Some(Pos { line: 4, column: 7 })
        );
    }

    #[test]
    fn maps_rendered_lines_back() {
        let src = "a: 1\n{% for i in x %}\nb{{ i }}: 2\n{% endfor %}\nc: {{ v }}\nd: 4\n";
        let out = "a: 1\nb1: 2\nb2: 2\nc: 9\nd: 4\n";
        let map = LineMap::new(src, out);
        assert_eq!(map.source_line(1), (1, true));
        assert_eq!(map.source_line(5), (6, true));
        let (line, same) = map.source_line(4);
        assert!(!same);
        assert!((2..=5).contains(&line), "{line}");
    }
}
