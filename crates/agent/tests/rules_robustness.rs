//! Whatever a rules file says, parsing it and classifying paths with it never panics: a
//! broken aide.conf is an error naming its line, and any path gets an answer.

use polaris_agent::integrity::rules::{ftype, parse};
use polaris_agent::integrity::select::Selection;
use proptest::prelude::*;

/// Lines built from the pieces aide.conf is made of, so the generator reaches deep into
/// the parser instead of failing on the first character.
fn line() -> impl Strategy<Value = String> {
    let path = prop::collection::vec(
        prop_oneof![
            Just("/etc".to_string()),
            Just("/".to_string()),
            Just("/a/b".to_string()),
            Just(".*".to_string()),
            Just("\\.".to_string()),
            Just("$".to_string()),
            Just("(x|y)".to_string()),
            Just("[0-9]+".to_string()),
            Just("\\ ".to_string()),
            Just("@@{V}".to_string()),
            "[a-z(\\[*?^$\\\\]{0,3}",
        ],
        1..5,
    )
    .prop_map(|parts| parts.concat());
    let expr = prop::collection::vec(
        prop_oneof![
            Just("p"),
            Just("R"),
            Just("L"),
            Just(">"),
            Just("sha256"),
            Just("md5"),
            Just("G"),
            Just("growing"),
            Just("S"),
            Just("bogus"),
            Just(""),
            Just("X"),
            Just("ANF"),
        ],
        1..4,
    )
    .prop_flat_map(|names| {
        let n = names.len();
        (Just(names), prop::collection::vec(prop_oneof![Just("+"), Just("-")], n))
    })
    .prop_map(|(names, ops)| names.iter().zip(ops).map(|(n, o)| format!("{o}{n}")).collect::<String>());
    prop_oneof![
        (
            prop_oneof![Just(""), Just("!"), Just("=")],
            path.clone(),
            prop_oneof![Just(""), Just(" f"), Just(" d,l"), Just(" 0"), Just(" q")],
            expr.clone()
        )
            .prop_map(|(kind, p, r, e)| format!("{kind}{p}{r} {e}")),
        (path.clone()).prop_map(|p| format!("!{p}")),
        expr.clone().prop_map(|e| format!("G = {e}")),
        Just("@@define V /srv".to_string()),
        Just("@@ifdef V".to_string()),
        Just("@@else".to_string()),
        Just("@@endif".to_string()),
        Just("@@undef V".to_string()),
        Just("database_out=file:/x".to_string()),
        Just("report_ignore_changed_attrs = b".to_string()),
        "[ -~]{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parsing_and_classifying_never_panic(lines in prop::collection::vec(line(), 0..12),
                                          paths in prop::collection::vec("(/[a-z.]{1,4}){1,4}", 1..8)) {
        let text = lines.join("\n");
        match parse(&text, "fuzz.conf", None) {
            Err(e) => prop_assert!(e.to_string().starts_with("fuzz.conf:"), "{e}"),
            Ok(rules) => {
                let mut selection = Selection::new(&rules.rules).expect("parsed rules compile");
                for path in &paths {
                    for t in [ftype::FILE, ftype::DIR, ftype::LINK] {
                        let _ = selection.classify(path.as_bytes(), t);
                    }
                }
            }
        }
    }
}
