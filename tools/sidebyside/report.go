package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// The markers around the section this tool owns in docs/benchmarks.md.
const (
	beginMarker = "<!-- side-by-side:begin -->"
	endMarker   = "<!-- side-by-side:end -->"
)

// total is one system and mode summed over its rounds.
type total struct {
	sys          system
	mode         loadgen.Mode
	requests     int
	counts       map[loadgen.Class]int
	failedRounds []int
	idle, under  int
	polite       int
	reloads      int
	reloadsDone  int
	reloadErrs   int
}

// totals sums runs by system and mode, in the order of o.Systems and
// o.Modes.
func totals(o Options, runs []*Run) []*total {
	var out []*total
	for _, name := range o.Systems {
		for _, mode := range o.Modes {
			var t *total
			for _, r := range runs {
				if r.System.name != name || r.Mode != mode {
					continue
				}
				if t == nil {
					t = &total{sys: r.System, mode: mode, counts: map[loadgen.Class]int{}}
					out = append(out, t)
				}
				t.requests += r.Result.Requests
				for c, n := range r.Result.Counts {
					t.counts[c] += n
				}
				t.failedRounds = append(t.failedRounds, r.Failed())
				t.idle += r.Result.IdleClosed
				t.under += r.Result.ClosedUnderClient
				t.polite += r.Result.ServerCloses
				t.reloads += len(r.Reloads)
				t.reloadsDone += r.ReloadsDone
				t.reloadErrs += len(r.ReloadErrors)
			}
		}
	}
	return out
}

func (t *total) failed() int { return t.requests - t.counts[loadgen.OK] }

// eof is every request whose connection ended in order before a whole
// response: the race with an idle close (loadgen.IdleRace) is one too.
func (t *total) eof() int { return t.counts[loadgen.EOF] + t.counts[loadgen.IdleRace] }

// other is every failure class the table has no column of its own for.
func (t *total) other() int {
	return t.counts[loadgen.Other] + t.counts[loadgen.Non2xx] + t.counts[loadgen.Malform] + t.counts[loadgen.Corrupt]
}

func modeName(m loadgen.Mode) string {
	if m == loadgen.NewConn {
		return "new connection"
	}
	return "keep-alive"
}

// Table is the markdown table of the runs, summed over rounds.
func Table(o Options, runs []*Run) string {
	var b strings.Builder
	b.WriteString("| system | reload | reloads done | load | requests | failed | per round | refused | reset | EOF | timeout | other | closed while idle | closed under the client | `Connection: close` |\n")
	b.WriteString("|---|---|--:|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, t := range totals(o, runs) {
		per := make([]string, len(t.failedRounds))
		for i, n := range t.failedRounds {
			per[i] = fmt.Sprint(n)
		}
		reload := t.sys.reload
		if t.reloadErrs > 0 {
			reload += fmt.Sprintf(" (%d of %d failed)", t.reloadErrs, t.reloads)
		}
		fmt.Fprintf(&b, "| %s | %s | %d of %d | %s | %s | %s | %s | %d | %d | %d | %d | %d | %s | %s | %s |\n",
			t.sys.title, reload, t.reloadsDone, t.reloads, modeName(t.mode), thousands(t.requests), bold(t.failed()), strings.Join(per, " / "),
			t.counts[loadgen.Refused], t.counts[loadgen.Reset], t.eof(), t.counts[loadgen.Timeout], t.other(),
			thousands(t.idle), thousands(t.under), thousands(t.polite))
	}
	return b.String()
}

// LatencyTable is the markdown table of the OK requests' latency in the
// reload window beside the steady runs', pooled over rounds, with the
// ratios; the section says what each figure is.
func LatencyTable(o Options, runs []*Run) string {
	var b strings.Builder
	b.WriteString("| system | load | OK requests in the window, steady / reloads | p50, ms | p99, ms | p99.9, ms | max, ms | p99 ratio per round |\n")
	b.WriteString("|---|---|--:|--:|--:|--:|--:|---|\n")
	for _, name := range o.Systems {
		for _, mode := range o.Modes {
			var title string
			var during, steady []time.Duration
			var per []string
			for _, r := range runs {
				if r.System.name != name || r.Mode != mode {
					continue
				}
				title = r.System.title
				during = append(during, r.Latency...)
				p := "–"
				if r.Steady != nil {
					steady = append(steady, r.Steady.Latency...)
					p = ratio(percentile(r.Latency, 0.99), percentile(r.Steady.Latency, 0.99))
				}
				per = append(per, p)
			}
			if title == "" {
				continue
			}
			slices.Sort(during)
			slices.Sort(steady)
			d, s := summarize(during), summarize(steady)
			cell := func(s, d time.Duration) string {
				return fmt.Sprintf("%s → %s (%s)", ms(s), ms(d), ratio(d, s))
			}
			fmt.Fprintf(&b, "| %s | %s | %s / %s | %s | %s | %s | %s | %s |\n",
				title, modeName(mode), thousands(s.n), thousands(d.n),
				cell(s.p50, d.p50), cell(s.p99, d.p99), cell(s.p999, d.p999), cell(s.worst, d.worst), strings.Join(per, " / "))
		}
	}
	return b.String()
}

// bold makes a non-zero failure count stand out.
func bold(n int) string {
	if n == 0 {
		return "0"
	}
	return "**" + thousands(n) + "**"
}

func thousands(n int) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// versions names what ran, for the section's context.
func versions() string {
	v := []string{runtime.Version()}
	for _, c := range [][]string{{"nginx", "-v"}, {"haproxy", "-v"}, {"node", "-v"}} {
		out, err := exec.Command(c[0], c[1:]...).CombinedOutput()
		if err != nil {
			continue
		}
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		line = strings.TrimPrefix(line, "nginx version: ")
		if c[0] == "haproxy" {
			f := strings.Fields(line)
			if len(f) >= 3 {
				line = "HAProxy " + f[2]
			}
		}
		if c[0] == "node" {
			line = "Node.js " + line
		}
		v = append(v, line)
	}
	return strings.Join(v, ", ")
}

// Section is the markdown section between the markers: the command, the
// table, the picture, and how each system was set up.
func Section(o Options, runs []*Run, pngRel, cmd string, elapsed time.Duration) string {
	var b strings.Builder
	b.WriteString(beginMarker + "\n")
	b.WriteString("## Side by side with nginx, HAProxy, tableflip and Node.js cluster\n\n")
	b.WriteString("Written by tools/sidebyside (edit the tool, not this section; the markers around it let one run rewrite it):\n\n")
	fmt.Fprintf(&b, "```\nscripts/sidebyside\n```\n\nthat is `cd tools/sidebyside && %s` once nginx and HAProxy are installed.\n\n", cmd)
	fmt.Fprintf(&b, "The same raw load (integration/loadgen: small POSTs written by hand, never retried) against each system, "+
		"%d clients, with a new connection per request and with keep-alive connections idling 0-%s between requests; "+
		"%d reloads %s apart under that load, from %s after it starts until %s after the last; %d rounds of every "+
		"system and load, summed below. One run on %s, %d CPUs, %s, loopback only; the whole run took %s.\n\n",
		o.Clients, o.MaxIdle, o.Reloads, o.Interval, o.Lead, o.Tail, o.Rounds,
		time.Now().UTC().Format("2006-01-02"), runtime.NumCPU(), versions(), elapsed.Round(time.Second))
	if len(o.UpgraderFlags) > 0 {
		// Otherwise the rows would pass for upgrader's defaults.
		fmt.Fprintf(&b, "Every upgrader ran with `%s` added to its command line.\n\n", strings.Join(o.UpgraderFlags, " "))
	}
	b.WriteString(Table(o, runs))
	fmt.Fprintf(&b, `
"Reloads done": the reloads that took effect, of those asked for: from the systems' own logs (nginx: SIGHUP received,
new binary process started; HAProxy: new worker forked) or from the newest X-Generation that answered (upgrader,
upgrader + Node.js, tableflip, Node.js cluster; a USR2 that reaches the Node.js primary during a restart is folded into
one more restart).
"failed" is every request that did not end in a whole 2xx response: refused (connect: ECONNREFUSED), reset (ECONNRESET
or EPIPE), EOF (the connection ended before a whole response), timeout (no whole response within %s), other (any other
error or status). "Closed while idle": keep-alive connections the server closed between two requests, found closed
before the next request was written (the request then goes on a new connection, so it is not counted as failed, but a
client that writes in the instant the close is on its way fails). "Closed under the client": a request on a reused
connection that failed. `+"`Connection: close`"+`: responses that ended their keep-alive connection politely.

`, o.RequestTimeout)
	b.WriteString(latencyText(o))
	b.WriteString(LatencyTable(o, runs))
	b.WriteString("\n")
	fmt.Fprintf(&b, "![OK requests and their p99 latency per 100 ms over time, reloads and failures, per system and load](%s)\n\n", pngRel)
	b.WriteString(`Per system (two rows) and load (columns), the round with the most failed requests (among rounds with as many, the one
that served the most requests):
OK responses per 100 ms (blue), every reload asked for (grey vertical lines), and above the curve one mark per failed
request at the time it failed, by class, and one per connection closed while idle; below it, on a log scale, the p99
latency of the OK requests sent in each 100 ms of that run (red; a gap where none was sent) and of the same round's
steady run (grey), the reloads marked again.

Where failures come from, by mechanism (the counts are the table's):

- A server that closes an idle keep-alive connection races the client writing its next request on it: the request
  meets the close and fails (reset, or EOF), or, when the client sees the close first, it costs a new connection
  ("closed while idle"). nginx's old workers close their idle keep-alive connections when they shut down gracefully
  (after HUP, and after QUIT in the binary upgrade); Node's ` + "`worker.disconnect()`" + ` closes the worker's server,
  which since Node 19 closes its idle connections too; tableflip's documented pattern calls ` + "`http.Server.Shutdown`" + `,
  which closes idle connections at once.
- tableflip's failures with a new connection per request (EOF, never refused): once Shutdown has begun, net/http drops
  a request it has already read, unanswered, on a connection accepted just before the listener closed
  ([architecture.md](architecture.md), "Draining").
- HAProxy with ` + "`option idle-close-on-response`" + ` answers the next request on each old connection with
  ` + "`Connection: close`" + ` instead of closing it idle; upgrader hands idle connections to the new generation, so
  their clients see no close at all. The same Node.js server that fails under the cluster's restart fails nothing under
  upgrader: the nodejs/ module stops the server accepting without ` + "`http.Server`" + `'s own close (which would drop
  its idle connections), and sends each idle connection over Node's IPC channel to upgrader, which passes it to a worker
  of the new generation.

`)
	b.WriteString(systemsSetup)
	b.WriteString(endMarker + "\n")
	return b.String()
}

// latencyText says what the latency table's figures are.
func latencyText(o Options) string {
	steady := fmt.Sprintf(`and in a steady run: the same system started afresh under the same load (clients, mode, gaps) for as long,
%s, with no reload, just before the run with reloads in every round, and measured over the same span of its load.`,
		(o.Lead + time.Duration(o.Reloads-1)*o.Interval + o.Tail).String())
	if !o.Steady {
		steady = "(no steady run this time: `-steady=false`; its figures and the ratios are \"–\")."
	}
	return fmt.Sprintf(`Latency of the requests that succeeded, during the reloads %s A request's latency is
loadgen's, in the client: from when the request began (before its connect with a new connection per request; with
keep-alive, before it is written, after the idle gap) until its whole response was read. OK requests only (the failed
ones are the table above). The window: the OK requests sent from the first reload asked for (%s after the load started;
in the steady run, %s after its load started) until the load was told to stop, %s after the last reload was asked for;
a request counts by when it was sent, however long it then took. Percentiles are nearest-rank (p99: the smallest
latency that 99%% of the requests did not exceed), over the window's requests of every round together; each cell is
steady → during the reloads (reloads ÷ steady), in milliseconds; "p99 ratio per round" is each round's p99 ratio on its
own.

`, steady, o.Lead, o.Lead, o.Tail)
}

// rewriteSection replaces the marked section of the markdown file at path
// with section, or appends it when the file has no markers yet.
func rewriteSection(path, section string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	var out []byte
	i, j := bytes.Index(old, []byte(beginMarker)), bytes.Index(old, []byte(endMarker))
	switch {
	case i >= 0 && j > i:
		end := j + len(endMarker)
		if end < len(old) && old[end] == '\n' {
			end++
		}
		out = append(append(append(out, old[:i]...), section...), old[end:]...)
	case i >= 0 || j >= 0:
		return fmt.Errorf("%s: only one of the markers %q and %q", path, beginMarker, endMarker)
	default:
		out = append(out, old...)
		if len(out) > 0 {
			out = append(bytes.TrimRight(out, "\n"), "\n\n"...)
		}
		out = append(out, section...)
	}
	return os.WriteFile(path, out, 0o644)
}

// writeOutputs writes the picture and, unless md is "-", the section.
func writeOutputs(o Options, runs []*Run, md, png, pngRel, cmd string, elapsed time.Duration) error {
	if err := os.MkdirAll(filepath.Dir(png), 0o755); err != nil {
		return err
	}
	if err := Plot(o, runs, png); err != nil {
		return fmt.Errorf("picture %s: %w", png, err)
	}
	if md == "-" {
		return nil
	}
	if err := rewriteSection(md, Section(o, runs, pngRel, cmd, elapsed)); err != nil {
		return fmt.Errorf("section of %s: %w", md, err)
	}
	return nil
}

// systemsSetup says how each system is set up and reloaded.
const systemsSetup = `How each system is set up and reloaded (each as the tool's own child on 127.0.0.1, in a temp dir, stopped by pid):

- **upgrader**: ` + "`upgrader run -l 127.0.0.1:0 --ready-hold 0 -- hello`" + ` (examples/hello, one worker, live-connection handoff on as by
  default; ` + "`--ready-hold 0`" + `, since reloads 0.5 s apart would fold into the default 500 ms hold, which no other system has), ` + "`kill -USR2`" + ` to upgrader.
- **nginx, reload**: ` + "`daemon off; master_process on; worker_processes auto;`" + ` (one worker per CPU), a server
  answering ` + "`return 200 \"hello from nginx\\n\";`" + `, nginx's defaults otherwise (keepalive_timeout 75s,
  keepalive_requests 1000); HUP to the master. nginx's graceful shutdown of the old workers closes their idle keep-alive
  connections: nginx has no setting that keeps them until their next request.
- **nginx, binary upgrade**: the same configuration with ` + "`daemon on`" + `, as "Upgrading Executable on the Fly"
  describes: USR2 to the master, wait until the new master (nginx.pid rewritten, the old one renamed .oldbin) runs its
  workers, then QUIT to the old master, and wait for it to exit before the next reload (a new master ignores USR2 while
  the old one lives). WINCH is left out (optional in the docs: QUIT stops the old workers gracefully too). ` + "`daemon on`" + `
  because nginx ignores the binary-upgrade signal in a master whose parent is the process that started it ("the changing
  binary signal is ignored"), which is the tool under ` + "`daemon off`" + `; daemonized, the master is adopted by the tool
  (a child subreaper).
- **HAProxy**: ` + "`haproxy -W -db`" + ` (master-worker, foreground), ` + "`http-request return status 200`" + ` in a
  frontend, USR2 to the master. Seamless reload as the 2.6 management guide gives it: in master-worker mode the master
  hands the listening sockets to the new worker itself (` + "`-x sockpair@`" + `; a stats socket with ` + "`expose-fd listeners`" + `
  is declared as well), and ` + "`option idle-close-on-response`" + `, which keeps an old worker's idle keep-alive connections
  open until their next request is answered with ` + "`Connection: close`" + `, instead of closing them at the reload;
  ` + "`timeout http-keep-alive 30s`" + `, ` + "`hard-stop-after 30s`" + `.
- **tableflip (bare)**: integration/cmd/bareflip, tableflip as its documentation shows it (Upgrade on the signal,
  ` + "`http.Server.Shutdown`" + ` on Exit); USR2 to the process serving now (tableflip's pid file).
- **upgrader + unchanged Go server**: ` + "`upgrader run -l 127.0.0.1:0 --ready-hold 0 -- plainhttp`" + `,
  integration/cmd/plainhttp: the same Go server as bareflip's without tableflip, as a new user brings it (net/http
  serving the inherited fd 3, ` + "`READY=1`" + ` through go-systemd, ` + "`http.Server.Shutdown`" + ` on SIGTERM, no drain package;
  [unchanged-servers.md](unchanged-servers.md)); ` + "`kill -USR2`" + ` to upgrader.
- **Node.js cluster**: tools/sidebyside/cluster.js, Node's ` + "`cluster`" + ` module, one worker per CPU listening on
  the primary's shared socket; on USR2 the primary replaces its workers one at a time: fork a new worker, and on its
  ` + "`'listening'`" + ` event ` + "`disconnect()`" + ` the old one (which closes its server and exits when its
  connections are done).
- **upgrader + Node.js (module)**: ` + "`upgrader run --ipc node -w N -l 127.0.0.1:0 --ready-hold 0 -- node examples/node/server.js`" + `,
  N the Node.js cluster's worker count (one per CPU), the same HTTP handler as cluster.js's workers, served through the
  upgrader-drain module (nodejs/: ` + "`serve(server)`" + ` listens on the inherited socket, says ready over Node's IPC
  channel, and on the drain signal hands its idle keep-alive connections to the next generation with
  ` + "`process.send(msg, socket)`" + `; [node-ipc.md](reference/node-ipc.md)); ` + "`kill -USR2`" + ` to upgrader.
`
