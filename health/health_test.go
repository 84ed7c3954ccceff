package health

import (
	"context"
	"errors"
	"io"
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
