package integration

import (
	"bufio"
	"errors"
	"fmt"
	"net"
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

// startUpgraderNOFILE is startUpgrader with RLIMIT_NOFILE set to nofile
// (soft and hard, as systemd's LimitNOFILE=) before upgrader runs: sh's
// ulimit, then exec, so the pid is upgrader's.
func startUpgraderNOFILE(t *testing.T, nofile int, args ...string) *proc {
	t.Helper()
	dir := t.TempDir()
	control := filepath.Join(dir, "control.sock")
	cmd := exec.Command("sh", append([]string{"-c", fmt.Sprintf(`ulimit -n %d && exec "$@"`, nofile), "sh",
		upgraderBin, "run", "--log-format", "json", "--log-level", "debug", "--control", control}, args...)...)
	cmd.Dir = dir
	return startProc(t, cmd, control)
}

// probeOutcome is what one health connection got.
type probeOutcome int

const (
	probeAnswered   probeOutcome = iota // 200
	probeRefused                        // a 503, or closed or reset before an answer
	probeUnanswered                     // no answer within the deadline: the server hangs
)

// probeLivez sends GET /livez on a new connection and reads the status
// line; the connection is returned open (nil if it could not be made), to
// be held idle as a hostile client would.
func probeLivez(addr string, timeout time.Duration) (net.Conn, probeOutcome, string) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, probeUnanswered, err.Error()
	}
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("GET /livez HTTP/1.1\r\nHost: upgrader\r\n\r\n")); err != nil {
		return c, probeRefused, err.Error()
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	c.SetDeadline(time.Time{})
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return c, probeUnanswered, err.Error()
	case err != nil:
		return c, probeRefused, err.Error()
	case strings.HasPrefix(line, "HTTP/1.1 200 "):
		return c, probeAnswered, line
	case strings.HasPrefix(line, "HTTP/1.1 503 "):
		return c, probeRefused, line
	}
	return c, probeUnanswered, fmt.Sprintf("unexpected status line %q", line)
}

// Ten thousand clients each send one GET /livez to the health endpoints
// and go idle, against an upgrader whose LimitNOFILE is 1,024: the
// supervisor keeps the fds a restart and an upgrade need. Status answers,
// an upgrade under load fails no request, a SIGKILLed worker is replaced,
// and every probe is answered or refused, never left hanging.
func TestHealthFloodCannotStarveTheSupervisor(t *testing.T) {
	const (
		nofile   = 1024
		clients  = 10_000
		parallel = 200
	)
	p := startUpgraderNOFILE(t, nofile, "-l", "127.0.0.1:0", "-w", "2", "--health", "127.0.0.1:0", "--", helloBin)
	addr := p.addr("")
	p.waitReady(1)
	haddr := p.healthAddr()
	base := countFDs(t, p.pid)

	var (
		mu       sync.Mutex
		held     []net.Conn
		outcomes [3]int
		sample   [3]string
	)
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	start := time.Now()
	next := make(chan struct{})
	var wg sync.WaitGroup
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				c, o, what := probeLivez(haddr, 5*time.Second)
				mu.Lock()
				if c != nil {
					held = append(held, c)
				}
				outcomes[o]++
				sample[o] = what
				mu.Unlock()
			}
		}()
	}
	for range clients {
		next <- struct{}{}
	}
	close(next)
	wg.Wait()
	flood := time.Since(start)
	fds := countFDs(t, p.pid)
	t.Logf("%d health clients in %s (%d parallel): %d answered, %d refused (e.g. %q), %d unanswered (e.g. %q); upgrader fds %d before, %d with the clients idle, of %d",
		clients, flood.Round(time.Millisecond), parallel, outcomes[probeAnswered], outcomes[probeRefused], sample[probeRefused],
		outcomes[probeUnanswered], sample[probeUnanswered], base, fds, nofile)

	// A balancer's next probe is still answered: idle connections make
	// room for it.
	if c, o, what := probeLivez(haddr, 5*time.Second); o != probeAnswered {
		t.Errorf("a fresh /livez with %d idle health clients: %s", len(held), what)
	} else {
		c.Close()
	}
	rec := p.expectLogged(5*time.Second, "the health endpoints' bound", func(m map[string]any) bool {
		return m["msg"] == "health endpoints" && m["max_conns"] != nil
	})
	maxConns, reserve := int(rec["max_conns"].(float64)), int(rec["fd_reserve"].(float64))
	t.Logf("health connections bound %d, supervisor's fd reserve %d", maxConns, reserve)
	if fds > nofile-reserve {
		t.Errorf("upgrader holds %d fds with the health clients idle, leaving %d of %d, less than its reserve %d", fds, nofile-fds, nofile, reserve)
	}

	// Clients that connect and send nothing are not idle: beyond the
	// bound they are refused, until the read-header timeout frees their
	// slots.
	const silentClients = 2000
	var silent [3]int
	next = make(chan struct{})
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				c, err := net.DialTimeout("tcp", haddr, 5*time.Second)
				if err != nil {
					mu.Lock()
					silent[probeUnanswered]++
					mu.Unlock()
					continue
				}
				c.SetReadDeadline(time.Now().Add(time.Second))
				line, err := bufio.NewReader(c).ReadString('\n')
				c.SetReadDeadline(time.Time{})
				var ne net.Error
				o := probeRefused
				if errors.As(err, &ne) && ne.Timeout() {
					o = probeAnswered // held, waiting for a request
				} else if err == nil && !strings.HasPrefix(line, "HTTP/1.1 503 ") {
					o = probeUnanswered
				}
				mu.Lock()
				held = append(held, c)
				silent[o]++
				mu.Unlock()
			}
		}()
	}
	for range silentClients {
		next <- struct{}{}
	}
	close(next)
	wg.Wait()
	fds = countFDs(t, p.pid)
	t.Logf("%d silent clients: %d held, %d refused, %d other; upgrader fds %d of %d", silentClients,
		silent[probeAnswered], silent[probeRefused], silent[probeUnanswered], fds, nofile)
	if silent[probeRefused] == 0 || silent[probeUnanswered] != 0 {
		t.Errorf("%d silent clients: %d refused, %d neither held nor refused; want the ones beyond the bound refused", silentClients,
			silent[probeRefused], silent[probeUnanswered])
	}
	if fds > nofile-reserve {
		t.Errorf("upgrader holds %d fds with silent health clients, leaving %d of %d, less than its reserve %d", fds, nofile-fds, nofile, reserve)
	}
	if c, o, what := probeLivez(haddr, 5*time.Second); o == probeUnanswered {
		t.Errorf("a fresh /livez with the health connections full: %s, want it answered or refused", what)
	} else {
		t.Logf("a fresh /livez with the health connections full: %q", strings.TrimSpace(what))
		c.Close()
	}

	// Every client still holds its connection: the supervisor answers.
	t0 := time.Now()
	st := p.status()
	t.Logf("status with %d idle health clients: %s", len(held), time.Since(t0).Round(time.Microsecond))
	if st.Current != 1 {
		t.Fatalf("status: current generation %d, want 1", st.Current)
	}
	if outcomes[probeUnanswered] != 0 {
		t.Errorf("%d of %d health probes were left unanswered (e.g. %s), want each answered or refused",
			outcomes[probeUnanswered], clients, sample[probeUnanswered])
	}
	if outcomes[probeAnswered] == 0 {
		t.Errorf("no health probe of %d was answered", clients)
	}

	// An upgrade under load.
	l := startLoad(loadgen.Config{Addr: addr, Clients: 8, Mode: loadgen.KeepAlive, MaxIdle: 20 * time.Millisecond})
	l.waitServed(t, 1, 50)
	t0 = time.Now()
	evs, _ := p.upgrade(30 * time.Second)
	if last := evs[len(evs)-1]; last.Event != "done" {
		t.Fatalf("upgrade with %d idle health clients: %+v", len(held), evs)
	}
	t.Logf("upgrade with %d idle health clients: %s", len(held), time.Since(t0).Round(time.Millisecond))
	l.waitServed(t, 2, 50)
	requireNoFailures(t, l.stop())

	// A crashed worker is replaced.
	victim := p.workerPids(2)[0]
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p.waitStatus(30*time.Second, "the SIGKILLed worker replaced", func(st supervise.Status) bool {
		g := genOf(st, 2)
		if g == nil || st.Current != 2 {
			return false
		}
		ready := 0
		for _, w := range g.Workers {
			if w.Pid == victim {
				return false
			}
			if w.State == supervise.WorkerReady {
				ready++
			}
		}
		return ready == 2
	})
	l = startLoad(loadgen.Config{Addr: addr, Clients: 8, Mode: loadgen.KeepAlive, MaxIdle: 20 * time.Millisecond})
	l.waitServed(t, 2, 50)
	requireNoFailures(t, l.stop())
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", p.pid)); err != nil {
		t.Fatalf("upgrader: %v", err)
	}
	t.Logf("upgrader fds at the end: %d", countFDs(t, p.pid))
}
