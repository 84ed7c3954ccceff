package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// checkTreeScript is a "new binary" whose self-check forks a child that
// leaves for a session of its own (setsid) and a plain background child,
// writes their pids and its own to a marker file beside itself, and hangs.
const checkTreeScript = `dir=$(dirname "$0")
setsid sleep 1000 &
s=$!
sleep 1001 &
b=$!
echo "$s $b $$" > "$dir/marker.tmp" && mv "$dir/marker.tmp" "$dir/marker"
wait`

// When upgrader is SIGKILLed during a self-check, the check's whole tree
// dies with it: the check, its background child and its setsid child,
// which a parent-death signal on the check alone leaves running.
func TestSelfCheckTreeDiesWithUpgrader(t *testing.T) {
	p, bin := startSelfUpgradable(t, "-l", "127.0.0.1:0", "--", helloBin)
	p.waitReady(1)
	workers := p.workerPids(1)
	writeScript(t, bin, checkTreeScript)
	marker := filepath.Join(filepath.Dir(bin), "marker")
	upgraded := make(chan error, 1)
	go func() {
		_, err := p.selfUpgrade(true)
		upgraded <- err
	}()

	var named []int
	for deadline := time.Now().Add(20 * time.Second); named == nil; time.Sleep(5 * time.Millisecond) { // polling interval
		if time.Now().After(deadline) {
			t.Fatalf("the self-check wrote no %s within 20s", marker)
		}
		if b, err := os.ReadFile(marker); err == nil {
			for _, f := range strings.Fields(string(b)) {
				pid, err := strconv.Atoi(f)
				if err != nil {
					t.Fatalf("marker %q: %v", b, err)
				}
				named = append(named, pid)
			}
		}
	}
	// Everything below upgrader but its workers is the check's: the
	// script's three, and whatever runs the check.
	tab, err := proctree.Read("/proc")
	if err != nil {
		t.Fatal(err)
	}
	kids := tab.Children()
	skip := map[int]bool{}
	for _, w := range workers {
		skip[w] = true
		for _, d := range tab.Below(kids, w) {
			skip[d] = true
		}
	}
	check := map[int]uint64{} // pid → start time, against pid reuse
	for _, pid := range tab.Below(kids, p.pid) {
		if !skip[pid] {
			check[pid] = tab[pid].StartTicks
		}
	}
	t.Cleanup(func() {
		for pid, started := range check {
			if checkProcAlive(pid, started) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	for _, pid := range named {
		if _, ok := check[pid]; !ok {
			t.Fatalf("pid %d of the marker %v is not below upgrader (pid %d): below it %v", pid, named, p.pid, check)
		}
	}

	t.Logf("the check's processes below upgrader: %d, the marker's %v", len(check), named)
	p.signal(syscall.SIGKILL)
	p.wait(10 * time.Second)
	var alive []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) { // polling interval
		alive = alive[:0]
		for pid, started := range check {
			if checkProcAlive(pid, started) {
				alive = append(alive, describeProc(pid))
			}
		}
		if len(alive) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(alive) > 0 {
		slices.Sort(alive)
		t.Fatalf("10s after upgrader was SIGKILLed during a self-check, %d of the check's %d processes still run: %s",
			len(alive), len(check), strings.Join(alive, "; "))
	}
	select {
	case err := <-upgraded:
		if err == nil {
			t.Fatal("upgrade --self succeeded, yet upgrader was killed during its self-check")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("upgrade --self did not end within 30s of upgrader's death")
	}
}

// checkProcAlive reports whether pid still runs (not a zombie) as the
// process that started at started (clock ticks since boot).
func checkProcAlive(pid int, started uint64) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	st, err := proctree.ParseStat(b)
	return err == nil && st.State != 'Z' && st.StartTicks == started
}

// describeProc names pid by its command line and parent, for a failure.
func describeProc(pid int) string {
	cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	ppid, _ := parentOf(pid)
	return fmt.Sprintf("pid %d (parent %d): %s", pid, ppid, strings.ReplaceAll(strings.TrimRight(string(cmd), "\x00"), "\x00", " "))
}

// A self-check that ends leaves nothing running: a child it started in a
// session of its own, deaf to the drain signal, is killed as the check
// exits, not left to upgrader as a stray until a drain deadline.
func TestSelfCheckLeavesNothingBehind(t *testing.T) {
	p, bin := startSelfUpgradable(t, "-l", "127.0.0.1:0", "--", helloBin)
	p.waitReady(1)
	writeScript(t, bin, `setsid sh -c 'trap "" TERM; exec sleep 1000' &
echo $! > "$(dirname "$0")/marker.tmp" && mv "$(dirname "$0")/marker.tmp" "$(dirname "$0")/marker"
exit 1`)
	out, err := p.selfUpgrade(true)
	if err == nil || !contains(out, "exited with status 1") {
		t.Fatalf("upgrade --self to a check that exits 1: %v, output %q; want it refused", err, out)
	}
	pid := waitPidFile(t, filepath.Join(filepath.Dir(bin), "marker"))
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return // gone already
	}
	st, err := proctree.ParseStat(b)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if checkProcAlive(pid, st.StartTicks) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	for deadline := time.Now().Add(10 * time.Second); checkProcAlive(pid, st.StartTicks); time.Sleep(5 * time.Millisecond) { // polling interval
		if time.Now().After(deadline) {
			t.Fatalf("10s after the self-check exited, its setsid child still runs: %s", describeProc(pid))
		}
	}
	if st := p.status(); st.Execs != 0 || !st.Ready {
		t.Fatalf("after the refusal: execs %d ready %v; want the old image serving", st.Execs, st.Ready)
	}
}
