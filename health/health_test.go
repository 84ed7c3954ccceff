package health

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	b, _ := io.ReadAll(rec.Body)
	return rec.Code, string(b)
}

func TestEndpointsTellTheTruth(t *testing.T) {
	snap := Snapshot{Reason: "no generation ready yet", Generations: map[string]int{"starting": 1}, Status: map[string]int{"current_generation": 0}}
	var err error
	s := New(func(ctx context.Context) (Snapshot, error) { return snap, err })
	h := s.Handler()

	if code, body := get(t, h, "/readyz"); code != 503 || !strings.Contains(body, "no generation ready yet") {
		t.Errorf("/readyz before ready: %d %q", code, body)
	}
	if code, _ := get(t, h, "/livez"); code != 200 {
		t.Errorf("/livez: %d", code)
	}
	snap.Ready, snap.Reason = true, ""
	snap.Generations = map[string]int{"active": 1, "draining": 1}
	if code, _ := get(t, h, "/readyz"); code != 200 {
		t.Errorf("/readyz when ready: %d", code)
	}
	if code, body := get(t, h, "/status"); code != 200 || !strings.Contains(body, `"current_generation": 0`) {
		t.Errorf("/status: %d %q", code, body)
	}
	s.ObserveUpgrade(true, 12*time.Millisecond)
	s.ObserveUpgrade(false, time.Second)
	s.ObserveRestart("watchdog")
	_, metrics := get(t, h, "/metrics")
	for _, want := range []string{
		`upgrader_ready 1`,
		`upgrader_generations{state="draining"} 1`,
		`upgrader_upgrades_total{result="ok"} 1`,
		`upgrader_upgrades_total{result="failed"} 1`,
		`upgrader_worker_restarts_total{cause="watchdog"} 1`,
		`upgrader_upgrade_duration_seconds_count 2`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	// A loop that does not answer: not live, not ready.
	err = errors.New("context deadline exceeded")
	if code, _ := get(t, h, "/livez"); code != 503 {
		t.Errorf("/livez with a stuck loop: %d", code)
	}
	if code, _ := get(t, h, "/readyz"); code != 503 {
		t.Errorf("/readyz with a stuck loop: %d", code)
	}
}

func TestListenNamesTheFlag(t *testing.T) {
	for _, addr := range []string{"8080", "127.0.0.1:99999"} {
		if _, err := Listen(addr); err == nil || !strings.Contains(err.Error(), "--health") || !strings.Contains(err.Error(), addr) {
			t.Errorf("Listen(%q): %v", addr, err)
		}
	}
}

// liveOn sends GET /livez on c and returns the status line.
func liveOn(c net.Conn) (string, error) {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, "GET /livez HTTP/1.1\r\nHost: h\r\n\r\n"); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.Status, nil
}

// At the bound, a new connection closes the one idle the longest; with
// none idle, it is refused with a 503; the open connections never exceed
// the bound.
func TestConnectionsAreBounded(t *testing.T) {
	const bound = 3
	s := New(func(ctx context.Context) (Snapshot, error) { return Snapshot{}, nil })
	s.SetMaxConns(bound)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.Serve(ctx, l)

	dial := func() net.Conn {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	var idle []net.Conn
	for i := range bound {
		c := dial()
		if st, err := liveOn(c); err != nil || st != "200 OK" {
			t.Fatalf("probe within the bound: %q %v", st, err)
		}
		idle = append(idle, c)
		// The server marks a connection idle once its answer is out,
		// which the client may read first: wait, so that the idle order
		// is the dial order.
		waitFor(t, func() bool { return s.idleConns() == i+1 })
	}
	// One more: the oldest idle one is closed for it.
	extra := dial()
	if st, err := liveOn(extra); err != nil || st != "200 OK" {
		t.Fatalf("probe at the bound with idle connections: %q %v", st, err)
	}
	idle[0].SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := idle[0].Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("the longest idle connection: read %d, %v; want it closed (EOF)", n, err)
	}
	// Connections that have sent nothing are not idle: at the bound with
	// none idle, the next is refused.
	for _, c := range append(idle[1:], extra) {
		c.Close()
	}
	waitFor(t, func() bool { return s.openConns() == 0 })
	for range bound {
		dial()
	}
	waitFor(t, func() bool { return s.openConns() == bound })
	c := dial()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(c)
	if !strings.HasPrefix(string(b), "HTTP/1.1 503 ") {
		t.Fatalf("a connection beyond the bound with none idle got %q, want a 503", b)
	}
	if n := s.openConns(); n != bound {
		t.Fatalf("%d connections open, want the bound %d", n, bound)
	}
	_, metrics := get(t, s.Handler(), "/metrics")
	for _, want := range []string{
		`upgrader_health_connections 3`,
		`upgrader_health_connections_closed_total{reason="idle"} 1`,
		`upgrader_health_connections_closed_total{reason="refused"} 1`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// waitFor polls cond (the server's state, which has no event to wait on).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

func TestMaxConnsLeavesTheReserve(t *testing.T) {
	for _, c := range []struct {
		limit   uint64
		reserve int
		want    int
	}{
		{1024, 490, 267},
		{1 << 20, 490, maxConnsCeiling},
		{300, 490, maxConnsFloor},
		{1 << 40, 0, maxConnsCeiling},
	} {
		if got := maxConnsFor(c.limit, c.reserve); got != c.want {
			t.Errorf("maxConnsFor(%d, %d) = %d, want %d", c.limit, c.reserve, got, c.want)
		}
	}
}
