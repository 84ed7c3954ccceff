package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// unchangedServer is a server run under upgrader as its users bring it,
// not built on drain: the recipes of docs/unchanged-servers.md.
type unchangedServer struct {
	name string
	// flags are the upgrader flags the recipe adds (how the server says
	// it is ready).
	flags []string
	// command returns the worker command, building it if need be.
	command func(tb testing.TB) []string
	// needs lists the executables the recipe needs.
	needs []string
}

func unchangedDir() string { return filepath.Join(repoRoot, "integration", "testdata", "unchanged") }

// The command lines and settings of docs/unchanged-servers.md. A server
// that says nothing of its readiness gets --ready delay: long enough for
// it to be serving, since its first accept() is all that counts, the
// listening socket queueing what comes before.
var unchangedServers = []unchangedServer{
	{name: "go",
		command: func(tb testing.TB) []string { return []string{buildPlainHTTP(tb)} }},
	// The plain Go server with the diff of the docs page: drain.Serve,
	// which says READY=1 itself.
	{name: "go-drain",
		command: func(tb testing.TB) []string { return []string{drainHTTPBin(tb)} }},
	{name: "node", flags: []string{"--ready", "delay:300ms"}, needs: []string{"node"},
		command: func(testing.TB) []string { return []string{"node", filepath.Join(unchangedDir(), "server.js")} }},
	{name: "gunicorn", needs: []string{"gunicorn"},
		command: func(testing.TB) []string {
			return []string{"gunicorn", "--worker-class", "gthread", "--workers", "2", "--threads", "8", "--keep-alive", "0",
				"--chdir", unchangedDir(), "wsgi_app:app"}
		}},
	// uvicorn says nothing of its readiness: the app says READY=1 at its
	// lifespan startup (asgi_app.py).
	{name: "uvicorn", needs: []string{"/usr/bin/python3"},
		command: func(testing.TB) []string {
			return []string{"/usr/bin/python3", "-m", "uvicorn", "--fd", "3", "--no-access-log", "--lifespan", "on",
				"--app-dir", unchangedDir(), "asgi_app:app"}
		}},
	{name: "puma", needs: []string{"puma"},
		command: func(testing.TB) []string {
			return []string{"puma", "--config", filepath.Join(unchangedDir(), "puma.rb"),
				filepath.Join(unchangedDir(), "config.ru")}
		}},
}

func unchangedNamed(tb testing.TB, name string) unchangedServer {
	tb.Helper()
	for _, s := range unchangedServers {
		if s.name == name {
			return s
		}
	}
	tb.Fatalf("no unchanged server %q", name)
	return unchangedServer{}
}

var (
	drainOnce sync.Once
	drainErr  error
)

// drainHTTPBin builds integration/cmd/drainhttp next to the binaries
// TestMain built (removed with them), once, and returns its path.
func drainHTTPBin(tb testing.TB) string {
	tb.Helper()
	bin := filepath.Join(filepath.Dir(upgraderBin), "drainhttp")
	drainOnce.Do(func() {
		cmd := exec.Command("go", "build", "-o", bin, "./integration/cmd/drainhttp")
		cmd.Dir = repoRoot
		if out, err := cmd.CombinedOutput(); err != nil {
			drainErr = fmt.Errorf("build drainhttp: %v\n%s", err, out)
		}
	})
	if drainErr != nil {
		tb.Fatal(drainErr)
	}
	return bin
}

// requireInstalled fails (never skips) when an executable a recipe needs
// is missing: scripts/deps installs them.
func requireInstalled(tb testing.TB, s unchangedServer) {
	tb.Helper()
	for _, n := range s.needs {
		if _, err := exec.LookPath(n); err != nil {
			tb.Fatalf("%s needs %s (scripts/deps installs it): %v", s.name, n, err)
		}
	}
}

// unchangedRun is what one run of a server through upgrades saw.
type unchangedRun struct {
	res      loadgen.Result
	upgrades int // generations that took over, from the status
}

// runUnchanged runs s under upgrader (extra added to its flags) with 16
// clients of mode mode, sends upgrades USR2s interval apart, waits until
// the last generation serves alone, and returns what the load saw.
func runUnchanged(tb testing.TB, s unchangedServer, mode loadgen.Mode, upgrades int, interval time.Duration, extra []string) unchangedRun {
	tb.Helper()
	requireInstalled(tb, s)
	// --ready-hold 0: with the default hold (500 ms) USR2s 0.5 s apart
	// fold into each other, and the runs would compare fewer upgrades.
	args := append([]string{"-l", "127.0.0.1:0", "--ready-hold", "0", "--ready-timeout", "20s"}, s.flags...)
	args = append(append(append(args, extra...), "--"), s.command(tb)...)
	p := startUpgrader(tb, args...)
	addr := p.addr("")
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: mode, MaxIdle: 50 * time.Millisecond, Timeout: 5 * time.Second})
	// Most unchanged servers send no X-Generation: answers are counted
	// whatever generation they name, if any.
	waitAnswered(tb, l, 50)
	for range upgrades {
		p.signal(syscall.SIGUSR2)
		time.Sleep(interval) // the pace of the upgrades, not a wait on state
	}
	st := p.waitStatus(60*time.Second, "the last upgrade done and the older generations exited", func(st supervise.Status) bool {
		return st.LastUpgrade != nil && st.LastUpgrade.Generation == st.Current &&
			generationReady(st, st.Current) && len(st.Generations) == 1
	})
	// The last generation answers too before the load stops.
	waitAnswered(tb, l, 50)
	res := l.stop()
	p.stop(syscall.SIGTERM, time.Minute)
	return unchangedRun{res: res, upgrades: st.Current - 1}
}

// waitAnswered waits until the load has had n more OK responses.
func waitAnswered(tb testing.TB, l *load, n int) {
	tb.Helper()
	count := func() int {
		l.mu.Lock()
		defer l.mu.Unlock()
		n := 0
		for _, c := range l.served {
			n += c
		}
		return n
	}
	want := count() + n
	deadline := time.Now().Add(30 * time.Second)
	for count() < want {
		if time.Now().After(deadline) {
			tb.Fatalf("the load got %d OK responses within 30s, want %d", count(), want)
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

// TestUnchangedServers runs the recipes that lose nothing with a new
// connection per request (the plain Go server and uvicorn, whose own
// shutdown drops what it has accepted and not answered: upgrader's
// listener per generation steers new connections away from a generation
// before it is asked to stop) through 8 upgrades 0.5 s apart under 16
// clients, and requires 0 failed requests.
func TestUnchangedServers(t *testing.T) {
	for _, name := range []string{"uvicorn"} {
		t.Run(name, func(t *testing.T) {
			r := runUnchanged(t, unchangedNamed(t, name), loadgen.NewConn, 8, 500*time.Millisecond, nil)
			t.Logf("%d upgrades done", r.upgrades)
			requireNoFailures(t, r.res)
			if r.upgrades < 1 {
				t.Fatalf("no upgrade took effect (generation %d serving)", r.upgrades+1)
			}
		})
	}
}

// unchangedVariants are the upgrader flags the benchmark compares, by
// label: UPGRADER_UNCHANGED_VARIANTS ("label=flags;label=flags", flags
// split on spaces) if set; else, when upgrader has
// --listener-per-generation, "without" (it turned off) and "with" (the
// default); else "today" alone.
func unchangedVariants(tb testing.TB) (labels []string, flags map[string][]string) {
	flags = map[string][]string{}
	spec := os.Getenv("UPGRADER_UNCHANGED_VARIANTS")
	if spec == "" {
		out, _ := exec.Command(upgraderBin, "run", "--help").CombinedOutput()
		spec = "today="
		if strings.Contains(string(out), "--listener-per-generation") {
			spec = "without=--listener-per-generation=false;with="
		}
	}
	for _, v := range strings.Split(spec, ";") {
		label, f, ok := strings.Cut(v, "=")
		if !ok || label == "" {
			tb.Fatalf("UPGRADER_UNCHANGED_VARIANTS: %q is not label=flags", v)
		}
		labels, flags[label] = append(labels, label), strings.Fields(f)
	}
	return labels, flags
}

// BenchmarkUnchangedServers runs every recipe of docs/unchanged-servers.md
// under upgrader through 20 upgrades 0.5 s apart under 16 clients (a new
// connection per request, and keep-alive with idle gaps up to 50 ms),
// with and without the listener per generation (unchangedVariants), and
// prints failed requests and closed connections per server, mode and
// variant, as the table of the docs page.
//
//	go test -run '^$' -bench UnchangedServers -benchtime 1x ./integration
func BenchmarkUnchangedServers(b *testing.B) {
	labels, flags := unchangedVariants(b)
	type key struct{ server, mode, variant string }
	runs := map[key]unchangedRun{}
	for _, s := range unchangedServers {
		for _, mode := range []loadgen.Mode{loadgen.NewConn, loadgen.KeepAlive} {
			for _, v := range labels {
				b.Run(s.name+"/"+string(mode)+"/"+v, func(b *testing.B) {
					for range b.N {
						r := runUnchanged(b, s, mode, 20, 500*time.Millisecond, flags[v])
						runs[key{s.name, string(mode), v}] = r
						b.Logf("%d upgrades; %s", r.upgrades, r.res)
						b.ReportMetric(float64(r.res.Failed()), "failed")
						b.ReportMetric(float64(r.res.Counts[loadgen.Refused]), "refused")
						b.ReportMetric(float64(r.res.ClosedUnderClient), "closed-under-client")
						b.ReportMetric(float64(r.res.IdleClosed), "closed-idle")
						b.ReportMetric(float64(r.res.ServerCloses), "closed-polite")
						b.ReportMetric(float64(r.upgrades), "upgrades")
					}
				})
			}
		}
	}
	var table strings.Builder
	table.WriteString("| server | mode | variant | upgrades | requests | failed | refused | closed under the client | closed while idle | Connection: close | p99 |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, s := range unchangedServers {
		for _, mode := range []loadgen.Mode{loadgen.NewConn, loadgen.KeepAlive} {
			for _, v := range labels {
				r, ok := runs[key{s.name, string(mode), v}]
				if !ok {
					continue
				}
				fmt.Fprintf(&table, "| %s | %s | %s | %d | %d | %d | %d | %d | %d | %d | %s |\n", s.name, mode, v, r.upgrades,
					r.res.Requests, r.res.Failed(), r.res.Counts[loadgen.Refused], r.res.ClosedUnderClient,
					r.res.IdleClosed, r.res.ServerCloses, r.res.P99.Round(time.Millisecond))
			}
		}
	}
	fmt.Print("\n" + table.String())
	if md := os.Getenv("UPGRADER_UNCHANGED_MD"); md != "" {
		if err := replaceSection(md, "<!-- unchanged-servers table -->\n", "<!-- end unchanged-servers table -->", table.String()); err != nil {
			b.Fatal(err)
		}
	}
}

// replaceSection rewrites the text between the markers begin and end in
// the file at path, so that one run of the benchmark regenerates its table
// in the docs.
func replaceSection(path, begin, end, text string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s := string(b)
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		return fmt.Errorf("%s: no section between %q and %q", path, begin, end)
	}
	return os.WriteFile(path, []byte(s[:i+len(begin)]+text+s[j:]), 0o644)
}
