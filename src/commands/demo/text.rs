//! Text of the demo documents: titles with the dirt of real ones, descriptions, file
//! contents, and the word lists they are drawn from.

use bson::RawBson;
use rand::{seq::SliceRandom, Rng};
use rand_chacha::ChaCha8Rng;

/// A time the legacy code stored as text: a JavaScript `Date` string or digits.
pub(super) fn malformed_time(rng: &mut ChaCha8Rng, t: i64) -> RawBson {
    let when = chrono::DateTime::from_timestamp(t, 0).unwrap_or_default();
    RawBson::String(match rng.gen_range(0..3) {
        0 => when
            .format("%a %b %d %Y %H:%M:%S GMT+0000 (Coordinated Universal Time)")
            .to_string(),
        1 => t.to_string(),
        _ => when.format("%d/%m/%Y %H:%M").to_string(),
    })
}

pub(super) fn title(rng: &mut ChaCha8Rng) -> Option<String> {
    let base = format!(
        "{} {}",
        ADJECTIVES.choose(rng).unwrap(),
        NOUNS.choose(rng).unwrap()
    );
    let r: f64 = rng.gen();
    if r < 0.03 {
        return None;
    }
    Some(if r < 0.06 {
        match rng.gen_range(0..3) {
            0 => format!("  {base}  "),
            1 => format!("{base}\n"),
            _ => format!("\t{base} "),
        }
    } else if r < 0.066 {
        ["", "   "].choose(rng).unwrap().to_string()
    } else if r < 0.09 {
        let e = EMOJI.choose(rng).unwrap();
        if rng.gen_bool(0.5) {
            format!("{e} {base}")
        } else {
            format!("{base} {e}")
        }
    } else if r < 0.12 {
        format!("{base} ({})", 2016 + rng.gen_range(0..11))
    } else {
        base
    })
}

pub(super) fn description(rng: &mut ChaCha8Rng) -> String {
    if rng.gen_bool(0.25) {
        return String::new();
    }
    let mut s = String::new();
    for _ in 0..rng.gen_range(1..=3) {
        s.push_str(SENTENCES.choose(rng).unwrap());
        s.push(' ');
    }
    s.pop();
    s
}

pub(super) fn html(rng: &mut ChaCha8Rng) -> String {
    let lib = LIBS.choose(rng).unwrap();
    format!(
        "<!DOCTYPE html>\n<html>\n  <head>\n    <meta charset=\"utf-8\">\n    <title>{}</title>\n    \
         <script src=\"{lib}\"></script>\n    <link rel=\"stylesheet\" href=\"styles.css\">\n  </head>\n  \
         <body>\n    <svg width=\"960\" height=\"{}\"></svg>\n    <script src=\"index.js\"></script>\n  </body>\n</html>\n",
        NOUNS.choose(rng).unwrap(),
        [400, 500, 600].choose(rng).unwrap()
    )
}

pub(super) fn javascript(rng: &mut ChaCha8Rng, lines: std::ops::Range<usize>) -> String {
    let mut s = String::from("const svg = d3.select('svg');\n");
    for _ in 0..rng.gen_range(lines) {
        s.push_str(JS_LINES.choose(rng).unwrap());
        s.push('\n');
    }
    s
}

pub(super) fn readme(rng: &mut ChaCha8Rng) -> String {
    format!(
        "# {} {}\n\n{}\n",
        ADJECTIVES.choose(rng).unwrap(),
        NOUNS.choose(rng).unwrap(),
        description(rng)
    )
}

pub(super) fn css(rng: &mut ChaCha8Rng) -> String {
    format!(
        "body {{ margin: 0; overflow: hidden; }}\n.tick text {{ font-size: {}px; }}\n.line {{ stroke: {}; }}\n",
        rng.gen_range(9..16),
        ["steelblue", "#e41a1c", "tomato", "black"].choose(rng).unwrap()
    )
}

pub(super) fn big_csv(rng: &mut ChaCha8Rng, bytes: usize) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes + 64);
    s.push_str("date,country,value,population\n");
    while s.len() < bytes {
        let _ = writeln!(
            s,
            "2019-{:02}-{:02},{},{:.3},{}",
            rng.gen_range(1..=12),
            rng.gen_range(1..=28),
            COUNTRIES.choose(rng).unwrap(),
            rng.gen::<f64>() * 1000.0,
            rng.gen_range(10_000..90_000_000)
        );
    }
    s
}

pub(super) const FIRST_NAMES: &[&str] = &[
    "Curran", "Ada", "Grace", "Linus", "Mike", "Amelia", "Sofia", "Mateo", "Yuki", "Olu", "Priya",
    "Chen", "Fatima", "Lars", "Ana", "Kwame", "Noor", "Ivan", "Elena", "Diego",
];
pub(super) const LAST_NAMES: &[&str] = &[
    "Kelleher", "Lovelace", "Hopper", "Bostock", "Nguyen", "Garcia", "Tanaka", "Okafor", "Sharma",
    "Wang", "Haddad", "Larsen", "Silva", "Mensah", "Rahman", "Petrov", "Rossi", "Muller",
];
pub(super) const MAIL_DOMAINS: &[&str] = &[
    "example.com",
    "example.org",
    "mail.example.net",
    "uni.example.edu",
];
pub(super) const ADJECTIVES: &[&str] = &[
    "Interactive",
    "Animated",
    "Stacked",
    "Grouped",
    "Responsive",
    "Zoomable",
    "Radial",
    "Hierarchical",
    "Simple",
    "Colorful",
    "Minimal",
    "Reusable",
    "Draggable",
    "Normalized",
    "Sortable",
];
pub(super) const NOUNS: &[&str] = &[
    "Bar Chart",
    "Line Chart",
    "Scatter Plot",
    "Force Layout",
    "Treemap",
    "Sunburst",
    "Choropleth Map",
    "Sankey Diagram",
    "Pie Chart",
    "Histogram",
    "Chord Diagram",
    "Globe",
    "Heatmap",
    "Box Plot",
    "Streamgraph",
    "Parallel Coordinates",
    "Word Cloud",
    "Network Graph",
];
pub(super) const EMOJI: &[&str] = &["📊", "📈", "🌍", "🔥", "✨", "🚀", "🎨", "🧪", "👩‍💻", "🇫🇷"];
pub(super) const SENTENCES: &[&str] = &[
    "A fork of the classic example.",
    "Data from the World Bank open data portal.",
    "Built with D3.js for a data visualization course.",
    "Hover over the marks to see details.",
    "Work in progress — do not use.",
    "Shows population growth by country since 1960.",
    "Uses the general update pattern with transitions.",
    "Données de l'INSEE, mise à jour 2019.",
    "Try dragging the nodes around!",
    "Exercise for week 3 of the course.",
];
pub(super) const LIBS: &[&str] = &[
    "https://unpkg.com/d3@5.16.0/dist/d3.min.js",
    "https://unpkg.com/d3@7",
    "https://cdnjs.cloudflare.com/ajax/libs/d3/4.13.0/d3.min.js",
    "https://unpkg.com/react@16/umd/react.production.min.js",
];
pub(super) const JS_LINES: &[&str] = &[
    "const width = +svg.attr('width');",
    "const height = +svg.attr('height');",
    "const margin = { top: 20, right: 30, bottom: 40, left: 50 };",
    "const xScale = d3.scaleLinear().domain(d3.extent(data, xValue)).range([0, innerWidth]).nice();",
    "const yScale = d3.scaleBand().domain(data.map(yValue)).range([0, innerHeight]).padding(0.1);",
    "d3.csv('data.csv').then(data => { data.forEach(d => { d.value = +d.value; }); render(data); });",
    "g.append('g').call(d3.axisLeft(yScale)).selectAll('.domain, .tick line').remove();",
    "g.selectAll('rect').data(data).enter().append('rect').attr('y', d => yScale(yValue(d)));",
    "const colorScale = d3.scaleOrdinal(d3.schemeCategory10);",
    "// TODO: fix the legend position",
    "const simulation = d3.forceSimulation(nodes).force('charge', d3.forceManyBody().strength(-30));",
    "svg.call(d3.zoom().on('zoom', () => g.attr('transform', d3.event.transform)));",
    "console.log(data);",
];
pub(super) const COMMIT_VERBS: &[&str] = &["Edit", "Update", "Fix", "Refactor", "Tweak", "Add"];
pub(super) const COMMIT_OBJECTS: &[&str] = &[
    "index.js",
    "index.html",
    "README.md",
    "styles.css",
    "axes",
    "colors",
    "tooltip",
    "data",
];
pub(super) const COUNTRIES: &[&str] = &[
    "France", "India", "Nigeria", "Brazil", "Japan", "Canada", "Kenya", "Peru", "Norway",
];
