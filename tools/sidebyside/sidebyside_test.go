package main

import (
	"bytes"
	"context"
	"flag"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gonum.org/v1/plot/vg"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// TestSmoke runs the benchmark's core on upgrader and the bare tableflip
// server with a few reloads, and checks the outcomes it is there to show
// (upgrader: no failed request, no connection closed by the server, in
// either load) and that the picture and the section come out. The other
// systems need nginx, HAProxy and Node.js: scripts/sidebyside runs them.
func TestSmoke(t *testing.T) {
	o := defaultOptions()
	o.Repo = "../.."
	o.Systems = []string{"upgrader", "bareflip"}
	o.Rounds, o.Reloads = 1, 4
	o.Interval, o.Lead, o.Tail = 300*time.Millisecond, 300*time.Millisecond, 500*time.Millisecond
	o.Clients = 8
	if err := o.check(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	runs, err := Bench(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != 4 {
		t.Fatalf("%d runs, want 4 (2 systems, 2 modes, 1 round)", len(runs))
	}
	for _, r := range runs {
		t.Logf("%s, %s: %s", r.System.name, r.Mode, r.Result)
		if len(r.Reloads) != o.Reloads || len(r.ReloadErrors) > 0 {
			t.Errorf("%s, %s: %d reloads, errors %q; want %d, none", r.System.name, r.Mode, len(r.Reloads), r.ReloadErrors, o.Reloads)
		}
		if r.Result.Counts[loadgen.OK] == 0 {
			t.Errorf("%s, %s: no OK response", r.System.name, r.Mode)
		}
		if r.Steady == nil || len(r.Steady.Reloads) != 0 || len(r.Steady.Latency) == 0 || len(r.Latency) == 0 {
			t.Errorf("%s, %s: want a steady run without reloads and latencies in both windows", r.System.name, r.Mode)
		}
		if r.System.name != "upgrader" {
			continue
		}
		res := r.Result
		if res.Failed() > 0 {
			t.Errorf("upgrader, %s: %d failed requests: %s", r.Mode, res.Failed(), res)
		}
		if closed := res.ServerCloses + res.ClosedUnderClient + res.IdleClosed; closed > 0 {
			t.Errorf("upgrader, %s: %d connections closed by the server: %s", r.Mode, closed, res)
		}
		if len(r.Events) > 0 {
			t.Errorf("upgrader, %s: events %v, want none", r.Mode, r.Events)
		}
	}

	dir := t.TempDir()
	md, pic := filepath.Join(dir, "benchmarks.md"), filepath.Join(dir, "benchmarks", "side-by-side.png")
	if err := os.WriteFile(md, []byte("# Benchmarks\n\nbefore\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second run rewrites the section the first appended
		if err := writeOutputs(o, runs, md, pic, "benchmarks/side-by-side.png", "go run . -test", time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	f, err := os.Open(pic)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("%s: %v", pic, err)
	}
	if b := img.Bounds(); b.Dx() < 500 || b.Dy() < 300 {
		t.Errorf("%s is %dx%d pixels", pic, b.Dx(), b.Dy())
	}
	doc, err := os.ReadFile(md)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(doc, []byte("# Benchmarks\n\nbefore\n\n"+beginMarker)) || bytes.Count(doc, []byte(beginMarker)) != 1 ||
		!bytes.HasSuffix(doc, []byte(endMarker+"\n")) {
		t.Errorf("%s: want the old text, then the section once:\n%s", md, doc)
	}
	for _, want := range []string{"| upgrader | USR2 to upgrader | 4 of 4 | new connection |", "| tableflip (bare) |",
		"| system | load | OK requests in the window, steady / reloads | p50, ms | p99, ms |", "](benchmarks/side-by-side.png)", "go run . -test"} {
		if !strings.Contains(string(doc), want) {
			t.Errorf("%s lacks %q", md, want)
		}
	}
}

func TestRewriteSectionKeepsTheRest(t *testing.T) {
	path := filepath.Join(t.TempDir(), "b.md")
	old := "a\n" + beginMarker + "\nold\n" + endMarker + "\nb\n"
	if err := os.WriteFile(path, []byte(old), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := rewriteSection(path, beginMarker+"\nnew\n"+endMarker+"\n"); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(path)
	if want := "a\n" + beginMarker + "\nnew\n" + endMarker + "\nb\n"; string(got) != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if err := os.WriteFile(path, []byte("a\n"+endMarker+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := rewriteSection(path, "x"); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("one marker only: error %v, want one naming %s", err, path)
	}
}

func TestOptionsCheck(t *testing.T) {
	o := defaultOptions()
	o.Systems = []string{"upgrader"}
	if err := o.check(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []func(*Options){
		func(o *Options) { o.Rounds = 0 },
		func(o *Options) { o.Reloads = 1000 },
		func(o *Options) { o.Interval = time.Millisecond },
		func(o *Options) { o.Systems = []string{"apache"} },
	} {
		b := o
		bad(&b)
		if b.check() == nil {
			t.Errorf("%+v accepted", b)
		}
	}
}

// TestPercentilesAndBins: nearest-rank percentiles of known latencies, and
// the p99 of each 100 ms bin by send time, a bin with nothing sent 0.
func TestPercentilesAndBins(t *testing.T) {
	var sorted []time.Duration
	for i := 1; i <= 1000; i++ {
		sorted = append(sorted, time.Duration(i)*time.Millisecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Millisecond}, {0.99, 990 * time.Millisecond}, {0.999, 999 * time.Millisecond}, {1, time.Second}} {
		if got := percentile(sorted, c.q); got != c.want {
			t.Errorf("percentile(1..1000 ms, %v) = %s, want %s", c.q, got, c.want)
		}
	}
	if got := percentile(nil, 0.99); got != 0 {
		t.Errorf("percentile of none = %s, want 0", got)
	}
	samples := []sample{{10 * time.Millisecond, time.Millisecond}, {20 * time.Millisecond, 5 * time.Millisecond},
		{250 * time.Millisecond, 2 * time.Millisecond}, {310 * time.Millisecond, 9 * time.Millisecond}}
	bins := p99PerBin(samples, 4)
	want := []time.Duration{5 * time.Millisecond, 0, 2 * time.Millisecond, 9 * time.Millisecond}
	for i := range want {
		if bins[i] != want[i] {
			t.Errorf("bin %d: p99 %s, want %s (bins %v)", i, bins[i], want[i], bins)
		}
	}
	in := inWindow(samples, 20*time.Millisecond, 310*time.Millisecond)
	if len(in) != 2 || in[0] != 2*time.Millisecond || in[1] != 5*time.Millisecond {
		t.Errorf("inWindow(20ms, 310ms) = %v, want [2ms 5ms]", in)
	}
}

// The legend's columns fit across the picture, one load mode or two, and
// no entry is wider than its column (it would run into the next).
func TestLegendFits(t *testing.T) {
	for modes := 1; modes <= 2; modes++ {
		w := vg.Inch * 7.5 * vg.Length(modes)
		lg, err := newLegend(w)
		if err != nil {
			t.Fatal(err)
		}
		cols := (len(lg.entries) + lg.perCol - 1) / lg.perCol
		if vg.Length(cols)*lg.colW > w {
			t.Errorf("%d modes: %d columns of %v do not fit in %v", modes, cols, lg.colW, w)
		}
		for _, e := range lg.entries {
			if lw := lg.style.Width(e.name) + legendPad; lw > lg.colW {
				t.Errorf("%d modes: %q is %v wide, its column %v", modes, e.name, lw, lg.colW)
			}
		}
	}
}

// The command written into the docs names each flag once, with the value
// it ended with, quoted where a shell needs it.
func TestCommandNamesEachFlagOnce(t *testing.T) {
	fs := flag.NewFlagSet("sidebyside", flag.ContinueOnError)
	fs.Int("rounds", 3, "")
	fs.String("repo", "../..", "")
	fs.String("upgrader-flags", "", "")
	fs.Bool("steady", true, "")
	fs.String("modes", "new,keepalive", "")
	args := []string{"-repo", "../..", "-rounds", "3", "-rounds", "2", "-upgrader-flags", "--start-idle=false --x", "-steady=false"}
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	want := "go run . -repo ../.. -rounds 2 -steady=false -upgrader-flags '--start-idle=false --x'"
	if got := command(fs); got != want {
		t.Fatalf("command = %s\nwant      %s", got, want)
	}
}
