package supervise

import (
	"context"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// A self-check that hangs past its timeout is killed with its whole tree:
// its group, and a child that moved to a session of its own (setsid),
// which the group kill misses.
func TestSelfCheckTimeoutKillsItsWholeTree(t *testing.T) {
	env := newFakeEnv()
	env.checkOut = SelfCheckLine("v2", true) + "\n"
	cfg := testConfig(t, Config{Executable: "/bin/upgrader", Version: "v1", Signals: true})
	h := start(t, cfg, env, nil)
	w := h.started()
	h.ready(w)
	h.sync()
	progress, err := h.s.SelfUpgrade(context.Background(), SelfRequest{ClientFD: -1})
	if err != nil {
		t.Fatal(err)
	}
	check := <-env.checks
	self := h.s.spawnEnv.supervisorPid
	env.setTable(proctree.Table{
		w:     {Pid: w, PPid: self, Pgid: w, State: 'S'},
		check: {Pid: check, PPid: self, Pgid: check, State: 'S'},
		900:   {Pid: 900, PPid: check, Pgid: 900, Sid: 900, State: 'S'},
	})
	go func() {
		for p := range progress {
			if p.Ack != nil {
				close(p.Ack)
			}
		}
	}()
	want := map[int]bool{-check: true, 900: true}
	for timeout := time.After(SelfCheckTimeout + 5*time.Second); len(want) > 0; {
		select {
		case k := <-env.kills:
			if k.sig != unix.SIGKILL || !want[k.pid] {
				t.Fatalf("signal %v to %d, want SIGKILL to one of %v", k.sig, k.pid, want)
			}
			delete(want, k.pid)
		case <-timeout:
			t.Fatalf("no SIGKILL to %v after the self-check's timeout", want)
		}
	}
}
