package supervise

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// While the connections of a replaced generation are counted (off the
// loop, for someone following the upgrade), it is draining: a STOPPING=1
// from one of its workers does not refill a slot of it.
func TestReplacedGenerationIsNotRefilledWhileCounted(t *testing.T) {
	env := newFakeEnv()
	env.connBlock = make(chan struct{})
	defer close(env.connBlock)
	h := start(t, testConfig(t, Config{}), env, nil)
	g1 := h.started()
	h.ready(g1)
	if _, err := h.s.StartUpgrade(context.Background()); err != nil {
		t.Fatal(err)
	}
	g2 := h.started()
	h.ready(g2)
	if st := h.status(); len(st.Generations) != 2 || st.Generations[0].State != GenDraining {
		t.Fatalf("generations during the count: %+v", st.Generations)
	}
	h.notify(g1, "STOPPING", "1")
	h.noStart(200 * time.Millisecond)
	if st := h.status(); st.Restarts != 0 {
		t.Fatalf("%d restarts for a replaced generation's worker", st.Restarts)
	}
}

// A self-upgrade queued behind an upgrade someone follows waits for the
// count; one that could wait no longer carries the replaced generation
// as draining, and the new image asks its workers to drain.
func TestSelfExecDuringCountDrainsTheReplacedGeneration(t *testing.T) {
	env := newFakeEnv()
	env.connBlock = make(chan struct{})
	defer close(env.connBlock)
	env.checkOut = SelfCheckLine("v2", true) + "\n"
	cfg := testConfig(t, Config{Executable: "/bin/upgrader", Version: "v1", Signals: true})
	h := start(t, cfg, env, nil)
	g1 := h.started()
	h.ready(g1)
	if _, err := h.s.StartUpgrade(context.Background()); err != nil {
		t.Fatal(err)
	}
	g2 := h.started()
	progress, err := h.s.SelfUpgrade(context.Background(), SelfRequest{ClientFD: -1, SelfOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	h.ready(g2)
	h.exit(<-env.checks, 0)
	for p := range progress {
		if p.Ack != nil {
			close(p.Ack)
		}
	}
	var st State
	if err := json.Unmarshal(<-env.execs, &st); err != nil {
		t.Fatal(err)
	}
	env2 := newFakeEnv()
	env2.nextPid = 1000
	start(t, cfg, env2, &st).killed(g1, unix.SIGTERM)
}

// A stop while the count runs ends the upgrade's watchers with the
// replaced generation's exit: Upgrade returns.
func TestUpgradeReturnsWhenStoppedDuringCount(t *testing.T) {
	env := newFakeEnv()
	env.connBlock = make(chan struct{})
	h := start(t, testConfig(t, Config{}), env, nil)
	g1 := h.started()
	h.ready(g1)
	res := make(chan error, 1)
	go func() { _, err := h.s.Upgrade(context.Background()); res <- err }()
	g2 := h.started()
	h.ready(g2)
	h.sync()
	h.s.post(evSignal{unix.SIGQUIT})
	for range 2 {
		k := <-env.kills
		h.exit(k.pid, 9)
	}
	if err := h.result(); err != nil {
		t.Fatal(err)
	}
	close(env.connBlock)
	select {
	case <-res:
	case <-time.After(5 * time.Second):
		t.Fatal("Upgrade did not return after Run returned")
	}
}

// Stop and Status before Run end with their context.
func TestCallsBeforeRunEndWithTheirContext(t *testing.T) {
	s, err := newSupervisor(testConfig(t, Config{}), newFakeEnv())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := s.Stop(ctx); err == nil {
		t.Fatal("Stop before Run succeeded")
	}
	if _, err := s.Status(ctx); err == nil {
		t.Fatal("Status before Run succeeded")
	}
}
