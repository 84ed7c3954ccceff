package integration

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/supervise"
)

// strayJS serves on the inherited fd 3 and ignores SIGTERM, so that only
// the deadline's SIGKILL ends it; it writes its pid to its argument once
// it listens.
const strayJS = `process.on('SIGTERM', () => {});
require('http').createServer((q, r) => r.end('stray\n'))
  .listen({fd: 3}, () => require('fs').writeFileSync(process.argv[2], String(process.pid)));`

// getOnce sends one request on a connection of its own: a pooled
// keep-alive connection would keep asking the same process.
func getOnce(url string) (string, error) {
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		return "", err
	}
	req.Close = true
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// waitPidFile waits until path holds a pid.
func waitPidFile(t *testing.T, path string) int {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if b, err := os.ReadFile(path); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
				return pid
			}
		}
	}
	t.Fatalf("no pid in %s after 20s", path)
	return 0
}

// listedStray finds pid in the status: the generation that lists it.
func listedStray(st supervise.Status, pid int) (gen int, rec supervise.WorkerRecord, ok bool) {
	for _, g := range st.Generations {
		for _, w := range g.Workers {
			if w.Pid == pid || slices.Contains(w.Lingering, pid) {
				return g.N, w, true
			}
		}
	}
	return 0, supervise.WorkerRecord{}, false
}

// A worker's child that leaves everything upgrader could know it by (its
// session, its environment) and is orphaned to upgrader when the worker
// exits still holds the listener. It is stale by construction: status
// lists it under its generation, it gets the drain signal and is killed at
// that generation's deadline, and the generations after it serve alone.
func TestStrayOrphanIsDrainedWithItsGeneration(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "stray.pid")
	script := filepath.Join(dir, "run")
	js := filepath.Join(dir, "stray.js")
	if err := os.WriteFile(js, []byte(strayJS), 0o644); err != nil {
		t.Fatal(err)
	}
	writeScript(t, script, fmt.Sprintf("setsid env -i /usr/bin/node %s %s &\nexec %s", js, pidFile, helloBin))
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--drain-timeout", "3s", "--", script)
	addr := p.addr("")
	p.waitReady(1)
	stray := waitPidFile(t, pidFile)
	t.Cleanup(func() { syscall.Kill(stray, syscall.SIGKILL) })
	if ppid, ok := parentOf(stray); !ok || ppid != p.workerPids(1)[0] {
		t.Fatalf("the stray %d runs below %d (alive %v), want generation 1's worker", stray, ppid, ok)
	}
	served := false
	for i := 0; i < 2000 && !served; i++ {
		body, err := getOnce("http://" + addr + "/")
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		served = strings.HasPrefix(body, "stray")
	}
	if !served {
		t.Fatal("the stray answered none of 2000 requests: it does not share the listener")
	}

	writeScript(t, script, "exec "+helloBin)
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	st := p.waitStatus(10*time.Second, "the stray listed", func(st supervise.Status) bool {
		_, _, ok := listedStray(st, stray)
		return ok
	})
	gen, rec, _ := listedStray(st, stray)
	if gen != 1 || !rec.Stray || rec.State != supervise.WorkerLingering {
		t.Fatalf("the stray is listed in generation %d as %+v, want generation 1, stray, lingering", gen, rec)
	}
	// SIGTERM is ignored: the deadline's SIGKILL ends it, and generation
	// 1 with it.
	p.waitExited(1)
	if _, alive := parentOf(stray); alive {
		t.Fatalf("the stray %d still runs once generation 1 has exited", stray)
	}
	p.upgradeTo(3)
	p.upgradeTo(4)
	for i := 0; i < 50; i++ {
		body, err := getOnce("http://" + addr + "/")
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if !strings.Contains(body, "generation 4") {
			t.Fatalf("request %d answered %q after three upgrades, want generation 4", i, body)
		}
	}
	if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
		t.Fatalf("graceful stop exited %d", code)
	}
}
