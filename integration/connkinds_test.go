package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// Every connection drains right: each kind of connection that
// examples/hello serves goes through 20 upgrades 0.5 s apart under 16
// clients, handoff on (the default). For each, every request succeeds and
// no generation serves more than 2 s after the next one is ready, so a
// drain never waits for its deadline; --drain-timeout is upgrader's
// default, 30 s, so that one that does shows up as an old generation
// serving late and as --max-draining kills (the 5th generation draining at
// once kills the oldest, under its clients).
func TestConnectionKindsDrain(t *testing.T) {
	const (
		clients  = 16
		upgrades = 20
		spacing  = 500 * time.Millisecond
		// The spec's outcome: no old generation serving longer than this
		// after the next one is ready.
		lateBound = 2 * time.Second
		size50MB  = "52428800"
	)
	for _, k := range []struct {
		name  string
		hello []string // hello's flags
		load  []string // loadgen's flags, besides -addr and -clients
		// check is the kind's own outcome, besides zero failures and no
		// late generation.
		check func(t *testing.T, r loadgen.Result)
		// idleRace: the drain closes this kind's idle connections (it
		// cannot hand them off), so a request may cross the close
		// (loadgen.IdleRace). It is counted and reported, not failed:
		// clients retry it, and the drain's own tests show that it ends
		// such a connection in order, never by a reset, and serves no
		// request sent after its close. Every other class must stay at
		// zero.
		idleRace bool
	}{
		{
			// Finding 1: the client sends its next request on the
			// keep-alive connection at once, while the handler still works
			// for 20 ms after its whole response is out; net/http's
			// background read takes a byte of that request.
			name: "http1-next-request-early",
			load: []string{"-mode", "keepalive", "-path", "/?size=65536&tail=20ms"},
			check: func(t *testing.T, r loadgen.Result) {
				// Connections move on (handed off, or closed politely and
				// reopened): the load follows the upgrades.
				if len(r.Generations) < 10 {
					t.Errorf("responses came from %d generations %v; want at least 10 of the 21", len(r.Generations), r.Generations)
				}
			},
		},
		{
			// Finding 5: TLS connections are never handed off, and these
			// idle up to 4 s between requests. (-tls: the certificate of
			// hello -tls is not verified, on loopback.)
			name:     "tls-http1-idle",
			hello:    []string{"-tls"},
			load:     []string{"-mode", "keepalive", "-tls", "-idle", "4s"},
			idleRace: true,
		},
		{
			// Finding 5: HTTP/2 over TLS (ALPN), idle up to 1 s between
			// streams; each client has its own connection.
			name:  "h2-tls",
			hello: []string{"-tls"},
			load:  []string{"-mode", "h2", "-tls", "-idle", "1s"},
		},
		{
			// Finding 5 again, with idle gaps up to 4 s, as for TLS
			// HTTP/1.1: a draining generation that waits for a client's
			// next stream to say GOAWAY serves up to a gap late. (With
			// gaps up to 1 s that stays under the 2 s bound and passes
			// even when the drain does so.)
			name:  "h2-tls-idle",
			hello: []string{"-tls"},
			load:  []string{"-mode", "h2", "-tls", "-idle", "4s"},
		},
		{
			// Finding 2: net/http's own cleartext HTTP/2 (prior knowledge)
			// must not be handed off as if it were HTTP/1.
			name:  "h2c",
			hello: []string{"-h2c"},
			load:  []string{"-mode", "h2", "-idle", "1s"},
		},
		{
			// Long responses in flight at every drain: each finishes in
			// its generation, whole and intact. -timeout is for a stuck
			// response, not a slow one.
			name: "50MB",
			load: []string{"-mode", "keepalive", "-path", "/?size=" + size50MB, "-expect-size", size50MB, "-timeout", "1m"},
			check: func(t *testing.T, r loadgen.Result) {
				if r.Counts[loadgen.Corrupt] != 0 || r.Counts[loadgen.OK] == 0 {
					t.Errorf("%d intact and %d corrupt 50 MB bodies; want every body intact", r.Counts[loadgen.OK], r.Counts[loadgen.Corrupt])
				}
			},
		},
	} {
		t.Run(k.name, func(t *testing.T) {
			p := startUpgrader(t, append([]string{"-l", "127.0.0.1:0", "--drain-timeout", "30s", "--", helloBin}, k.hello...)...)
			addr := p.addr("")
			p.waitReady(1)
			ready := map[int]time.Time{} // by generation, from the 2nd
			l := startLoadProc(t, append([]string{"-addr", addr, "-clients", strconv.Itoa(clients)}, k.load...)...)
			// Every client is connected and served before the first upgrade.
			l.waitServed(t, 1, clients)

			// The spacing is the scenario: an upgrade every 0.5 s, each
			// sent once the previous one is ready (an earlier USR2 would be
			// queued and coalesced).
			tick := time.NewTicker(spacing)
			for gen := 2; gen <= upgrades+1; gen++ {
				<-tick.C
				p.signal(syscall.SIGUSR2)
				ready[gen] = readyAt(t, p.waitReady(gen), gen)
			}
			tick.Stop()
			last := upgrades + 1
			// Every drain ends, with the load still on, so that whatever
			// an old generation serves until then is seen. upgrader's own
			// --drain-timeout bounds this wait.
			st := p.waitStatus(45*time.Second, "every generation before the last exited", func(st supervise.Status) bool {
				return len(st.Generations) == 1 && st.Generations[0].N == last
			})
			// And the newest generation has the load.
			l.waitServed(t, last, clients)
			r, served := l.stop(t)
			t.Logf("served by generation: %v; handoffs: %+v", r.Generations, st.Handoffs)

			// a. Zero failed requests, the idle race aside where the drain
			// closes idle connections.
			failed := r.Failed()
			if k.idleRace {
				failed -= r.Counts[loadgen.IdleRace]
				t.Logf("requests that crossed the close of their idle connection (%s): %d of %d", loadgen.IdleRace, r.Counts[loadgen.IdleRace], r.Requests)
			}
			if r.Requests == 0 || failed != 0 {
				t.Errorf("%d of %d requests failed: %s", failed, r.Requests, r)
			} else {
				t.Logf("load: %s", r)
			}
			// b. No old generation serving longer than 2 s after the next
			// one is ready (for each generation that has a successor).
			if late := lateResponses(served, ready, lateBound); late != "" {
				t.Errorf("old generations served after their successor was ready (bound %s):\n%s", lateBound, late)
			}
			// c. The kind's own outcome.
			if k.check != nil {
				k.check(t, r)
			}
		})
	}
}

// loadgenBin is integration/cmd/loadgen, built once, without the race
// detector: the race-instrumented client reads about 3.5 times slower
// (every read's buffer goes through the detector), which on a 2-core
// machine stretches 16 concurrent 50 MB responses past the ~2 s in which
// four newer generations start draining at 0.5 s spacing, and
// --max-draining then kills their generation under them, whatever the
// drain does. The client is the measuring instrument here, not the code
// under test (loadgen's own tests run under the detector).
var loadgenBin = sync.OnceValues(func() (string, error) {
	bin := filepath.Join(filepath.Dir(helloBin), "loadgen") // TestMain removes the directory
	cmd := exec.Command("go", "build", "-o", bin, "./integration/cmd/loadgen")
	cmd.Dir = repoRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build loadgen: %v\n%s", err, out)
	}
	return bin, nil
})

// procLoad is integration/cmd/loadgen running with -responses: the OK
// responses as they come, then its result.
type procLoad struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	served []servedAt
	count  map[int]int // OK responses by generation
	result *loadgen.Result
	bad    []string // lines that are neither
	done   chan struct{}
}

// startLoadProc runs loadgen with args (a 2-minute -duration bounds it in
// case the test never stops it); the test's end kills it if it still runs.
func startLoadProc(t *testing.T, args ...string) *procLoad {
	t.Helper()
	bin, err := loadgenBin()
	if err != nil {
		t.Fatal(err)
	}
	l := &procLoad{count: map[int]int{}, done: make(chan struct{})}
	l.cmd = exec.Command(bin, append([]string{"-duration", "2m", "-json", "-responses"}, args...)...)
	l.cmd.Stderr = os.Stderr
	out, err := l.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(l.done)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			l.line(sc.Text())
		}
	}()
	t.Cleanup(func() {
		l.cmd.Process.Kill()
		<-l.done
		l.cmd.Wait()
	})
	return l
}

// line takes one line of loadgen's output.
func (l *procLoad) line(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if strings.HasPrefix(s, "{") {
		var r loadgen.Result
		if err := json.Unmarshal([]byte(s), &r); err == nil {
			l.result = &r
			return
		}
	}
	f := strings.Fields(s)
	if len(f) == 3 && f[0] == "response" {
		gen, err1 := strconv.Atoi(f[1])
		ns, err2 := strconv.ParseInt(f[2], 10, 64)
		if err1 == nil && err2 == nil {
			l.served = append(l.served, servedAt{gen, time.Unix(0, ns)})
			l.count[gen]++
			return
		}
	}
	l.bad = append(l.bad, s)
}

// waitServed waits until generation gen has answered n more OK responses
// than it had at the call.
func (l *procLoad) waitServed(t *testing.T, gen, n int) {
	t.Helper()
	l.mu.Lock()
	want := l.count[gen] + n
	l.mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for {
		l.mu.Lock()
		got := l.count[gen]
		l.mu.Unlock()
		if got >= want {
			return
		}
		select {
		case <-l.done:
			t.Fatalf("loadgen ended with %d OK responses from generation %d, want %d", got, gen, want)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the load got %d OK responses from generation %d within 30s, want %d", got, gen, want)
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

// stop ends the load (SIGTERM: the requests in flight finish) and returns
// its result and every OK response.
func (l *procLoad) stop(t *testing.T) (loadgen.Result, []servedAt) {
	t.Helper()
	if err := l.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("stop loadgen: %v", err)
	}
	// Its -timeout bounds the requests in flight.
	select {
	case <-l.done:
	case <-time.After(2 * time.Minute):
		t.Fatal("loadgen did not stop within 2m of SIGTERM")
	}
	err := l.cmd.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.result == nil || len(l.bad) > 0 {
		t.Fatalf("loadgen (%v) printed no result, or lines it should not: %q", err, l.bad)
	}
	return *l.result, l.served
}

// servedAt is one OK response: its generation and when its header came.
type servedAt struct {
	gen int
	at  time.Time
}

// lateResponses describes, one line per generation, the responses a
// generation g served later than bound after generation g+1 was ready, or
// returns "" when there are none.
func lateResponses(served []servedAt, ready map[int]time.Time, bound time.Duration) string {
	type lateness struct {
		n     int
		worst time.Duration
	}
	late := map[int]*lateness{}
	for _, s := range served {
		next, ok := ready[s.gen+1]
		if !ok {
			continue
		}
		if after := s.at.Sub(next); after > bound {
			l := late[s.gen]
			if l == nil {
				l = &lateness{}
				late[s.gen] = l
			}
			l.n++
			l.worst = max(l.worst, after)
		}
	}
	var b strings.Builder
	for _, g := range slices.Sorted(maps.Keys(late)) {
		fmt.Fprintf(&b, "  generation %d: %d responses, the last %s after generation %d was ready\n",
			g, late[g].n, late[g].worst.Round(time.Millisecond), g+1)
	}
	return b.String()
}
