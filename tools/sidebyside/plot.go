package main

import (
	"fmt"
	"image/color"
	"os"
	"strconv"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/text"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// mark is how one kind of event is drawn above the OK curve: at its own
// height (a fraction of the curve's highest bin), so that kinds do not
// hide one another.
type mark struct {
	class loadgen.Class
	label string
	level float64
	style draw.GlyphStyle
}

var marks = []mark{
	{IdleClass, "closed while idle (not failed)", 1.06, draw.GlyphStyle{Color: color.RGBA{0, 150, 150, 255}, Radius: vg.Points(2), Shape: draw.RingGlyph{}}},
	{loadgen.Refused, "failed: refused", 1.11, draw.GlyphStyle{Color: color.RGBA{255, 140, 0, 255}, Radius: vg.Points(2.5), Shape: draw.SquareGlyph{}}},
	{loadgen.Reset, "failed: reset", 1.16, draw.GlyphStyle{Color: color.RGBA{220, 0, 0, 255}, Radius: vg.Points(2.5), Shape: draw.CircleGlyph{}}},
	{loadgen.EOF, "failed: EOF", 1.21, draw.GlyphStyle{Color: color.RGBA{150, 0, 200, 255}, Radius: vg.Points(2.5), Shape: draw.TriangleGlyph{}}},
	{loadgen.Timeout, "failed: timeout", 1.26, draw.GlyphStyle{Color: color.RGBA{130, 80, 0, 255}, Radius: vg.Points(2.5), Shape: draw.PyramidGlyph{}}},
	{loadgen.Other, "failed: other", 1.31, draw.GlyphStyle{Color: color.Black, Radius: vg.Points(2.5), Shape: draw.CrossGlyph{}}},
}

// markOf is the mark of an event's class; the rarer failure classes go
// with "other", as in the table.
func markOf(c loadgen.Class) mark {
	if c == loadgen.IdleRace {
		c = loadgen.EOF // an EOF too, as in the table
	}
	for _, m := range marks {
		if m.class == c {
			return m
		}
	}
	return marks[len(marks)-1]
}

var (
	p99Style    = draw.LineStyle{Color: color.RGBA{210, 30, 30, 255}, Width: vg.Points(1)}
	steadyStyle = draw.LineStyle{Color: color.RGBA{140, 140, 140, 255}, Width: vg.Points(1)}
	okStyle     = draw.LineStyle{Color: color.RGBA{30, 90, 200, 255}, Width: vg.Points(1)}
	reloadStyle = draw.LineStyle{Color: color.RGBA{150, 150, 150, 255}, Width: vg.Points(0.6), Dashes: []vg.Length{vg.Points(2), vg.Points(2)}}
)

// worst is the round of sys under mode with the most failed requests;
// among rounds that failed as many, the one that served the most, so that
// a round slowed down by whatever else shares the machine is not the one
// shown for want of a failure.
func worst(runs []*Run, name string, mode loadgen.Mode) *Run {
	var w *Run
	for _, r := range runs {
		if r.System.name != name || r.Mode != mode {
			continue
		}
		if w == nil || r.Failed() > w.Failed() || r.Failed() == w.Failed() && r.Result.Requests > w.Result.Requests {
			w = r
		}
	}
	return w
}

// panel draws one run: OK per Bin over time, the reloads, the events.
func panel(o Options, r *Run) (*plot.Plot, error) {
	p := plot.New()
	failed := r.Failed()
	p.Title.Text = fmt.Sprintf("%s, %s: %d failed, %d closed while idle (round %d of %d)",
		r.System.title, modeName(r.Mode), failed, r.Result.IdleClosed, r.Round, o.Rounds)
	p.Title.TextStyle.Font.Size = vg.Points(10)
	p.X.Label.Text = "seconds since the load started"
	p.Y.Label.Text = "OK / 100 ms"
	p.X.Label.TextStyle.Font.Size = vg.Points(8)
	p.Y.Label.TextStyle.Font.Size = vg.Points(8)
	p.X.Min, p.X.Max = 0, r.Length.Seconds()
	full := int(r.Length / Bin) // the last bin is cut short by the load's end
	ok := make(plotter.XYs, 0, full)
	top := 1.0
	for i := 0; i < full; i++ {
		n := 0
		if i < len(r.OK) {
			n = r.OK[i]
		}
		ok = append(ok, plotter.XY{X: (float64(i) + 0.5) * Bin.Seconds(), Y: float64(n)})
		top = max(top, float64(n))
	}
	p.Y.Min, p.Y.Max = 0, top*1.36
	// Whole requests: gonum's default labels some ranges "2500.00".
	p.Y.Tick.Marker = plot.TickerFunc(func(min, max float64) []plot.Tick {
		ticks := plot.DefaultTicks{}.Ticks(min, max)
		for i := range ticks {
			if ticks[i].Label != "" {
				ticks[i].Label = strconv.FormatFloat(ticks[i].Value, 'f', -1, 64)
			}
		}
		return ticks
	})
	for _, at := range r.Reloads {
		l, err := plotter.NewLine(plotter.XYs{{X: at.Seconds(), Y: 0}, {X: at.Seconds(), Y: top * 1.03}})
		if err != nil {
			return nil, err
		}
		l.LineStyle = reloadStyle
		p.Add(l)
	}
	line, err := plotter.NewLine(ok)
	if err != nil {
		return nil, err
	}
	line.LineStyle = okStyle
	p.Add(line)
	byMark := map[loadgen.Class]plotter.XYs{}
	for _, e := range r.Events {
		m := markOf(e.Class)
		byMark[m.class] = append(byMark[m.class], plotter.XY{X: e.At.Seconds(), Y: top * m.level})
	}
	for _, m := range marks {
		xys := byMark[m.class]
		if len(xys) == 0 {
			continue
		}
		s, err := plotter.NewScatter(xys)
		if err != nil {
			return nil, err
		}
		s.GlyphStyle = m.style
		p.Add(s)
	}
	return p, nil
}

// latencyPanel draws r's p99 latency per Bin over time on a log scale,
// in milliseconds, beside its steady run's, with the reloads marked. A
// bin in which no OK request was sent leaves a gap in its line.
func latencyPanel(r *Run) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("p99 latency per 100 ms: reloads %s ms, steady %s ms over the window",
		ms(percentile(r.Latency, 0.99)), steadyP99(r))
	p.Title.TextStyle.Font.Size = vg.Points(9)
	p.X.Label.Text = "seconds since the load started"
	p.Y.Label.Text = "p99, ms"
	p.X.Label.TextStyle.Font.Size = vg.Points(8)
	p.Y.Label.TextStyle.Font.Size = vg.Points(8)
	p.X.Min, p.X.Max = 0, r.Length.Seconds()
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	lo, hi := 0.0, 0.0
	series := func(bins []time.Duration, style draw.LineStyle) error {
		var run plotter.XYs
		flush := func() error {
			if len(run) == 0 {
				return nil
			}
			l, err := plotter.NewLine(run)
			if err != nil {
				return err
			}
			l.LineStyle = style
			p.Add(l)
			run = nil
			return nil
		}
		for i, d := range bins {
			if d <= 0 {
				if err := flush(); err != nil {
					return err
				}
				continue
			}
			v := float64(d) / float64(time.Millisecond)
			if lo == 0 || v < lo {
				lo = v
			}
			hi = max(hi, v)
			run = append(run, plotter.XY{X: (float64(i) + 0.5) * Bin.Seconds(), Y: v})
		}
		return flush()
	}
	if r.Steady != nil {
		if err := series(r.Steady.P99, steadyStyle); err != nil {
			return nil, err
		}
	}
	if err := series(r.P99, p99Style); err != nil {
		return nil, err
	}
	if lo == 0 {
		lo, hi = 0.1, 1
	}
	p.Y.Min, p.Y.Max = lo/1.5, hi*1.5
	for _, at := range r.Reloads {
		l, err := plotter.NewLine(plotter.XYs{{X: at.Seconds(), Y: p.Y.Min}, {X: at.Seconds(), Y: p.Y.Max}})
		if err != nil {
			return nil, err
		}
		l.LineStyle = reloadStyle
		p.Add(l)
	}
	return p, nil
}

// steadyP99 is the p99 of r's steady run over its window, "–" without.
func steadyP99(r *Run) string {
	if r.Steady == nil {
		return "–"
	}
	return ms(percentile(r.Steady.Latency, 0.99))
}

// legendEntry is one line of the legend.
type legendEntry struct {
	name  string
	thumb plot.Thumbnailer
}

// legendEntries are the legend's lines: the panels' lines, then the marks.
func legendEntries() ([]legendEntry, error) {
	var entries []legendEntry
	for _, e := range []struct {
		name  string
		style draw.LineStyle
	}{{"OK responses per 100 ms", okStyle}, {"reload asked for", reloadStyle},
		{"p99 latency per 100 ms, with reloads", p99Style}, {"p99 latency per 100 ms, steady run", steadyStyle}} {
		l, err := plotter.NewLine(plotter.XYs{{X: 0, Y: 0}, {X: 1, Y: 1}})
		if err != nil {
			return nil, err
		}
		l.LineStyle = e.style
		entries = append(entries, legendEntry{e.name, l})
	}
	for _, m := range marks {
		s, err := plotter.NewScatter(plotter.XYs{{X: 0, Y: 0}})
		if err != nil {
			return nil, err
		}
		s.GlyphStyle = m.style
		entries = append(entries, legendEntry{m.label, s})
	}
	return entries, nil
}

// legend is the picture's one legend, a strip above the panels: its
// entries in as many columns as fit across width, each as wide as the
// widest entry, so that no text runs into the next column whether the
// picture has one load mode or two.
type legend struct {
	entries []legendEntry
	style   text.Style
	perCol  int
	colW    vg.Length
}

const legendPad = vg.Length(20) // points: left of each column

func newLegend(width vg.Length) (*legend, error) {
	entries, err := legendEntries()
	if err != nil {
		return nil, err
	}
	l := plot.NewLegend()
	l.TextStyle.Font.Size = vg.Points(10)
	g := &legend{entries: entries, style: l.TextStyle}
	for _, e := range entries {
		g.colW = max(g.colW, l.TextStyle.Width(e.name))
	}
	g.colW += l.ThumbnailWidth + l.Padding + legendPad
	cols := max(1, min(len(entries), int(width/g.colW)))
	g.perCol = (len(entries) + cols - 1) / cols
	return g, nil
}

// height is the strip's height: a line per row and a margin.
func (g *legend) height() vg.Length {
	return vg.Length(g.perCol)*g.style.Height("Xg")*1.15 + vg.Points(10)
}

func (g *legend) draw(c draw.Canvas) {
	for i := 0; i*g.perCol < len(g.entries); i++ {
		l := plot.NewLegend()
		l.Top, l.Left = true, true
		l.TextStyle = g.style
		for _, e := range g.entries[i*g.perCol : min(len(g.entries), (i+1)*g.perCol)] {
			l.Add(e.name, e.thumb)
		}
		left := c.Min.X + vg.Length(i)*g.colW + legendPad
		l.Draw(draw.Crop(c, left-c.Min.X, 0, 0, 0))
	}
}

// Plot writes the picture to path: two rows per system (OK requests and
// events; p99 latency), one column per load mode, the worst round of each
// (see worst), and the legend on top.
func Plot(o Options, runs []*Run, path string) error {
	var rows [][]*plot.Plot
	for _, name := range o.Systems {
		var row, lat []*plot.Plot
		for _, mode := range o.Modes {
			r := worst(runs, name, mode)
			if r == nil {
				continue
			}
			p, err := panel(o, r)
			if err != nil {
				return err
			}
			l, err := latencyPanel(r)
			if err != nil {
				return err
			}
			row, lat = append(row, p), append(lat, l)
		}
		if len(row) == len(o.Modes) {
			rows = append(rows, row, lat)
		}
	}
	if len(rows) == 0 {
		return fmt.Errorf("no run to draw")
	}
	w := vg.Inch * 7.5 * vg.Length(len(o.Modes))
	lg, err := newLegend(w)
	if err != nil {
		return err
	}
	legendH := lg.height()
	h := vg.Inch*2.0*vg.Length(len(rows)) + legendH
	img := vgimg.NewWith(vgimg.UseWH(w, h), vgimg.UseDPI(96))
	dc := draw.New(img)
	lg.draw(draw.Crop(dc, 0, 0, h-legendH, -vg.Points(4)))
	tiles := draw.Tiles{Rows: len(rows), Cols: len(o.Modes), PadX: vg.Inch * 0.4, PadY: vg.Inch * 0.3,
		PadLeft: vg.Inch * 0.1, PadRight: vg.Inch * 0.2, PadBottom: vg.Inch * 0.1}
	canvases := plot.Align(rows, tiles, draw.Crop(dc, 0, 0, 0, -legendH))
	for i := range rows {
		for j := range rows[i] {
			rows[i][j].Draw(canvases[i][j])
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
