//! A small SVG line chart, enough to look at a benchmark's curves without a plotting stack.

use crate::sequential::SequentialReport;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// Lines `(label, points)` on shared axes; y runs from 0 to the larger of 1 and the highest point (rounded up).
pub fn svg(title: &str, x_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0));
    let x_max = xs.fold(1.0_f64, f64::max);
    // Round ticks: 0.2 steps up to at least 1.
    let y_max = (series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).fold(1.0_f64, f64::max) / 0.2).ceil() * 0.2;
    let px = |x: f64| LEFT + x / x_max * (W - LEFT - RIGHT);
    let py = |y: f64| TOP + (1.0 - y / y_max) * (H - TOP - BOTTOM);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" font-size=\"14\">{}</text>\n",
        LEFT,
        escape(title)
    );
    // Axes and grid.
    for i in 0..=5 {
        let y = y_max * i as f64 / 5.0;
        s += &format!(
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y0:.1}\" y2=\"{y0:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{y:.2}</text>\n",
            W - RIGHT,
            LEFT - 6.0,
            py(y) + 4.0,
            y0 = py(y)
        );
        let x = x_max * i as f64 / 5.0;
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            px(x),
            H - BOTTOM + 18.0,
            x.round()
        );
    }
    s += &format!(
        "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{LEFT}\" x2=\"{}\" y1=\"{b}\" y2=\"{b}\" stroke=\"black\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
        H - BOTTOM,
        W - RIGHT,
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0,
        escape(x_label),
        b = H - BOTTOM
    );
    for (k, (label, points)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let dash = if k / COLORS.len() % 2 == 1 { " stroke-dasharray=\"6 3\"" } else { "" };
        let path: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
            path.join(" ")
        );
        let ly = TOP + 10.0 + 18.0 * k as f64;
        s += &format!(
            "<line x1=\"{x0}\" x2=\"{x1}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            W - RIGHT + 34.0,
            ly + 4.0,
            escape(label),
            x0 = W - RIGHT + 10.0,
            x1 = W - RIGHT + 30.0
        );
    }
    s + "</svg>\n"
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Reliability, generalization and locality against documents injected, one set of lines per report.
pub fn sequential(reports: &[&SequentialReport]) -> String {
    let mut series = Vec::new();
    for r in reports {
        let pts = |f: &dyn Fn(&crate::sequential::Point) -> f64| -> Vec<(f64, f64)> {
            r.curve.iter().map(|p| (p.documents as f64, f(p))).collect()
        };
        let tag = if reports.len() > 1 { format!("{} ", r.strategy) } else { String::new() };
        series.push((format!("{tag}reliability"), pts(&|p| p.reliability)));
        series.push((format!("{tag}generalization"), pts(&|p| p.generalization)));
        series.push((format!("{tag}locality"), pts(&|p| p.locality)));
    }
    let names: Vec<&str> = reports.iter().map(|r| r.strategy.as_str()).collect();
    let injector = reports.first().map(|r| r.injector.as_str()).unwrap_or("");
    svg(&format!("sequential injection ({injector}): {}", names.join(" vs ")), "documents injected", &series)
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_per_series_inside_the_frame() {
        let s = super::svg(
            "t <&>",
            "x",
            &[("a".into(), vec![(0.0, 0.0), (10.0, 1.0)]), ("b".into(), vec![(5.0, 0.5), (10.0, 1.3)])],
        );
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("t &lt;&amp;&gt;"));
        assert!(s.trim_end().ends_with("</svg>"));
        // Every plotted point lies inside the drawing area.
        for poly in s.split("points=\"").skip(1) {
            for pt in poly.split('"').next().unwrap().split(' ') {
                let (x, y) = pt.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                assert!((super::LEFT..=super::W - super::RIGHT).contains(&x), "{x}");
                assert!((super::TOP..=super::H - super::BOTTOM).contains(&y), "{y}");
            }
        }
    }
}
