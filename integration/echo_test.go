package integration

import (
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"

	"github.com/seed6cb0314a/upgrader/supervise"
)

var (
	echoOnce sync.Once
	echoBin  string
	echoErr  error
)

// buildEcho builds examples/echo once, next to the binaries TestMain
// built (and removes).
func buildEcho(t *testing.T) string {
	t.Helper()
	echoOnce.Do(func() {
		echoBin = filepath.Join(filepath.Dir(helloBin), "echo")
		build := exec.Command("go", "build", "-o", echoBin, "./examples/echo")
		build.Dir = repoRoot
		if out, err := build.CombinedOutput(); err != nil {
			echoErr = fmt.Errorf("%v\n%s", err, out)
		}
	})
	if echoErr != nil {
		t.Fatalf("build examples/echo: %v", echoErr)
	}
	return echoBin
}

// wsSession is one WebSocket session's outcome.
type wsSession struct {
	name       string
	start, end time.Time
	replies    int
	gens       map[int]int // replies by generation
	err        error       // what cut it, if anything
}

// runWSSession opens a WebSocket session to echo at addr, sends a message
// every interval for d, checks every reply ("<generation> <the same
// message>", generations never going back), calls onReply for each, and
// ends the session with the closing handshake. Any failure (an error, a
// wrong or missing reply, a close from the server) is the session's err.
func runWSSession(addr, name string, d, interval time.Duration, onReply func(gen int, at time.Time)) (s wsSession) {
	s = wsSession{name: name, start: time.Now(), gens: map[int]int{}}
	defer func() { s.end = time.Now() }()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, br, _, err := ws.Dial(ctx, "ws://"+addr+"/ws")
	if err != nil {
		s.err = fmt.Errorf("dial: %w", err)
		return s
	}
	defer conn.Close()
	var r io.Reader = conn
	if br != nil { // bytes the server sent after its handshake response
		r = br
	}
	rw := struct {
		io.Reader
		io.Writer
	}{r, conn}
	last := 0
	for i := 0; time.Since(s.start) < d; i++ {
		msg := fmt.Sprintf("%s message %d", name, i)
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if err := wsutil.WriteClientText(conn, []byte(msg)); err != nil {
			s.err = fmt.Errorf("send %q: %w", msg, err)
			return s
		}
		data, err := wsutil.ReadServerText(rw)
		if err != nil {
			s.err = fmt.Errorf("reply to %q after %s: %w", msg, time.Since(s.start).Round(time.Millisecond), err)
			return s
		}
		at := time.Now()
		g, text, _ := strings.Cut(string(data), " ")
		gen, err := strconv.Atoi(g)
		if err != nil || text != msg || gen < last {
			s.err = fmt.Errorf("reply %q to %q; want \"<generation ≥ %d> %s\"", data, msg, last, msg)
			return s
		}
		last = gen
		s.replies++
		s.gens[gen]++
		onReply(gen, at)
		time.Sleep(interval) // the client's pace
	}
	// The closing handshake: our close, then the server's.
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if err := wsutil.WriteClientMessage(conn, ws.OpClose, ws.NewCloseFrameBody(ws.StatusNormalClosure, "")); err != nil {
		s.err = fmt.Errorf("send close: %w", err)
		return s
	}
	for {
		h, err := ws.ReadHeader(r)
		if err == nil {
			_, err = io.CopyN(io.Discard, r, h.Length)
		}
		if err != nil {
			s.err = fmt.Errorf("closing handshake: %w", err)
			return s
		}
		if h.OpCode == ws.OpClose {
			return s
		}
	}
}

// wsClients runs n clients, each opening sessions of length d one after
// another until stop is closed, pacing its messages interval apart.
type wsClients struct {
	mu       sync.Mutex
	sessions []wsSession
	last     map[int]time.Time // by generation, its last reply
	answered map[int]bool      // clients that had a reply
	wg       sync.WaitGroup
}

func startWSClients(addr string, n int, d, interval time.Duration, stop <-chan struct{}) *wsClients {
	c := &wsClients{last: map[int]time.Time{}, answered: map[int]bool{}}
	for i := range n {
		c.wg.Go(func() {
			for k := 0; ; k++ {
				s := runWSSession(addr, fmt.Sprintf("client %d session %d", i, k), d, interval, func(gen int, at time.Time) {
					c.mu.Lock()
					if at.After(c.last[gen]) {
						c.last[gen] = at
					}
					c.answered[i] = true
					c.mu.Unlock()
				})
				c.mu.Lock()
				c.sessions = append(c.sessions, s)
				c.mu.Unlock()
				select {
				case <-stop:
					return
				default:
				}
				if s.err != nil {
					return
				}
			}
		})
	}
	return c
}

// waitAnswered waits until every one of n clients has had a reply.
func (c *wsClients) waitAnswered(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		got := len(c.answered)
		c.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d WebSocket clients had a reply within 10s", got, n)
		}
		time.Sleep(5 * time.Millisecond) // polling interval
	}
}

// wait waits for every client's last session to end and returns them all.
func (c *wsClients) wait() []wsSession {
	c.wg.Wait()
	return c.sessions
}

// requireSessionsWhole fails the test for every session cut short.
func requireSessionsWhole(t *testing.T, sessions []wsSession, d time.Duration) {
	t.Helper()
	for _, s := range sessions {
		if s.err != nil {
			t.Errorf("%s cut after %d replies (%s): %v", s.name, s.replies, s.end.Sub(s.start).Round(time.Millisecond), s.err)
		} else if s.end.Sub(s.start) < d {
			t.Errorf("%s lasted %s, want %s", s.name, s.end.Sub(s.start), d)
		}
	}
}

// TestEchoSessionsSurviveUpgrades: WebSocket sessions (hijacked
// connections with the application's own framing) are handed from
// generation to generation across 20 upgrades, none is cut, and no old
// generation lingers with them.
func TestEchoSessionsSurviveUpgrades(t *testing.T) {
	const (
		clients  = 16
		length   = 10 * time.Second
		interval = 50 * time.Millisecond
		upgrades = 20
		linger   = 2 * time.Second // an old generation's last reply after the next is ready
	)
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", buildEcho(t))
	addr := p.addr("")
	ready := map[int]time.Time{1: readyAt(t, p.waitReady(1), 1)}
	stop := make(chan struct{})
	c := startWSClients(addr, clients, length, interval, stop)
	c.waitAnswered(t, clients)
	for i := range upgrades {
		time.Sleep(500 * time.Millisecond) // each generation serves the sessions this long
		p.signal(syscall.SIGUSR2)
		ready[i+2] = readyAt(t, p.waitReady(i+2), i+2)
	}
	close(stop)
	sessions := c.wait()
	requireSessionsWhole(t, sessions, length)

	// Handoffs happened: every generation answered, and every session
	// that lived through an upgrade was answered by more than one.
	c.mu.Lock()
	last := c.last
	c.mu.Unlock()
	for g := 1; g <= upgrades+1; g++ {
		if last[g].IsZero() {
			t.Errorf("generation %d answered no message", g)
		}
	}
	moved := 0
	for _, s := range sessions {
		across := false
		for _, at := range ready {
			across = across || (at.After(s.start) && at.Add(linger).Before(s.end))
		}
		if across && len(s.gens) < 2 {
			t.Errorf("%s lived through an upgrade but was answered by generation %v only", s.name, s.gens)
		}
		if len(s.gens) > 1 {
			moved++
		}
	}
	// The old generations left: none answered past linger after the
	// next one was ready.
	var latest time.Duration
	for g := 1; g <= upgrades; g++ {
		late := last[g].Sub(ready[g+1])
		if late > linger {
			t.Errorf("generation %d answered %s after generation %d was ready, want at most %s", g, late.Round(time.Millisecond), g+1, linger)
		}
		latest = max(latest, late)
	}
	st := p.waitStatus(10*time.Second, "only the newest generation left", func(st supervise.Status) bool {
		return len(st.Generations) == 1 && st.Generations[0].N == upgrades+1
	})
	if st.Handoffs.HandedOff == 0 {
		t.Errorf("handoff counts %+v: nothing was handed off", st.Handoffs)
	}
	t.Logf("%d sessions over %d upgrades, %d answered by several generations; an old generation's last reply at most %s after the next was ready; handoffs %+v",
		len(sessions), upgrades, moved, latest.Round(time.Millisecond), st.Handoffs)
}

// TestEchoSessionsDrainWithoutHandoff: with --no-handoff, the old
// generation keeps its WebSocket sessions until their clients end them,
// and exits then.
func TestEchoSessionsDrainWithoutHandoff(t *testing.T) {
	const (
		clients  = 4
		length   = 3 * time.Second
		interval = 50 * time.Millisecond
	)
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--no-handoff", "--", buildEcho(t))
	addr := p.addr("")
	p.waitReady(1)
	stop := make(chan struct{})
	close(stop) // one session each
	c := startWSClients(addr, clients, length, interval, stop)
	c.waitAnswered(t, clients)
	p.signal(syscall.SIGUSR2)
	st := p.waitReady(2)
	if g := genOf(st, 1); g == nil {
		t.Fatalf("generation 1 left at the upgrade, its %d sessions still open", clients)
	}
	sessions := c.wait()
	requireSessionsWhole(t, sessions, length)
	for _, s := range sessions {
		if len(s.gens) != 1 || s.gens[1] == 0 {
			t.Errorf("%s answered by generations %v, want 1 only (no handoff)", s.name, s.gens)
		}
	}
	// Its sessions over, the old generation drains to its end.
	p.waitStatus(10*time.Second, "generation 1 exited", func(st supervise.Status) bool { return genOf(st, 1) == nil })
}
