package supervise

import (
	"context"
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// everyState brings h to generations and workers in every state a
// self-upgrade can find them in: generation 1 draining, with one worker
// lingering (its main process exited, an orphan of its group left) and one
// hurried and killed, and a stray; generation 2 active, one worker a crash replacement,
// one taking handoffs; generation 3 starting, one worker ready and one
// starting. It returns the pids: gen 1's, then gen 2's, then gen 3's.
func everyState(t *testing.T, h *harness) []int {
	t.Helper()
	a, b := h.started(), h.started()
	h.notify(a, "READY", "1", "STATUS", "serving")
	h.ready(b)
	h.s.post(evSignal{unix.SIGUSR2})
	c, d := h.started(), h.started()
	h.ready(c)
	h.ready(d)
	// 301 is an orphan of a's group; 302 one nothing names, a stray.
	h.env.setTable(proctree.Table{301: {Pid: 301, PPid: h.s.spawnEnv.supervisorPid, Pgid: a},
		302: {Pid: 302, PPid: h.s.spawnEnv.supervisorPid, Pgid: 302, Sid: 302}})
	h.exit(a, 0)
	if err := h.env.handoff(c).Send(handoff.Message{Type: handoff.TypeAccept, Kinds: []string{"http"}}, nil); err != nil {
		t.Fatal(err)
	}
	h.waitHandled("ACCEPT", func(ev event) bool {
		e, ok := ev.(evHandoff)
		return ok && e.m.Type == handoff.TypeAccept
	})
	h.exit(d, 1) // a crash: replaced after a backoff
	e := h.started()
	h.ready(e)
	h.sync()
	h.s.call(context.Background(), func() {
		w := h.s.gens.byPid[b]
		h.s.hurry(w)
		h.s.kill9(w)
	})
	h.s.post(evSignal{unix.SIGUSR2})
	f, g := h.started(), h.started()
	h.notify(f, "READY", "1", "STATUS", "ready in generation 3")
	h.sync()
	return []int{a, b, c, e, f, g}
}

// saved saves h's supervisor as a self-upgrade would, through JSON, with
// its status at that moment.
func saved(t *testing.T, h *harness) (*State, Status) {
	t.Helper()
	var st *State
	var before Status
	var err error
	h.s.call(context.Background(), func() {
		before = h.s.snapshot()
		st, _, _, err = h.s.saveState(&selfUpgrade{req: SelfRequest{SelfOnly: true, ClientFD: -1}})
	})
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var back State
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	return &back, before
}

// A supervisor saved with workers in every state and resumed from the
// record (in a fake env, so in process) shows the same status: every
// field of every worker's and generation's record came across. A field
// added to a record is carried with no code to copy it; this test fails if
// everyState leaves one at its zero value, so that a new field gets a
// state that exercises it.
func TestSaveAndResumeRoundTrip(t *testing.T) {
	cfg := testConfig(t, Config{Workers: 2, Watchdog: time.Hour, Executable: "/bin/upgrader"})
	h := start(t, cfg, newFakeEnv(), nil)
	everyState(t, h)
	st, before := saved(t, h)
	requireEveryField(t, before)

	env := newFakeEnv()
	env.nextPid = 1000
	env.frozen = time.Now() // deadlines re-armed from the record come out the same
	env.setTable(proctree.Table{301: {Pid: 301, PPid: h.s.spawnEnv.supervisorPid, Pgid: before.Generations[0].Workers[0].Pid},
		302: {Pid: 302, PPid: h.s.spawnEnv.supervisorPid, Pgid: 302, Sid: 302}})
	h2 := start(t, cfg, env, st)
	after := h2.status()
	if after.Execs != before.Execs+1 || after.SelfUpgrade == nil || !after.SelfUpgrade.OK {
		t.Fatalf("after resume: execs %d (before %d), self-upgrade %+v", after.Execs, before.Execs, after.SelfUpgrade)
	}
	after.Execs, after.SelfUpgrade = before.Execs, before.SelfUpgrade
	bj, _ := json.MarshalIndent(before, "", " ")
	aj, _ := json.MarshalIndent(after, "", " ")
	if string(bj) != string(aj) {
		t.Fatalf("status differs after save and resume:\nbefore %s\nafter  %s", bj, aj)
	}
	// The resumed supervisor runs on: its handoff channels and upgrades
	// work.
	var accepts bool
	h2.s.call(context.Background(), func() {
		for _, w := range h2.s.gens.byPid {
			accepts = accepts || (w.takeOn != nil && w.Accepts["http"])
		}
	})
	if !accepts {
		t.Fatal("no resumed worker has its handoff channel and ACCEPT")
	}
}

// requireEveryField fails unless every field of WorkerRecord and of
// GenerationRecord is set in some worker or generation of st.
func requireEveryField(t *testing.T, st Status) {
	t.Helper()
	var gens, workers []reflect.Value
	for _, g := range st.Generations {
		gens = append(gens, reflect.ValueOf(g.GenerationRecord))
		for _, w := range g.Workers {
			workers = append(workers, reflect.ValueOf(w))
		}
	}
	// Reason is set only on a failed generation, which is forgotten once
	// its workers are gone: TestFailedUpgradeKeepsOldGeneration shows it.
	for _, set := range []struct {
		vals   []reflect.Value
		exempt map[string]bool
	}{{workers, nil}, {gens, map[string]bool{"Reason": true}}} {
		if len(set.vals) == 0 {
			t.Fatal("no records")
		}
		typ := set.vals[0].Type()
		for i := range typ.NumField() {
			name := typ.Field(i).Name
			if set.exempt[name] {
				continue
			}
			found := false
			for _, v := range set.vals {
				found = found || !v.Field(i).IsZero()
			}
			if !found {
				t.Errorf("%s.%s is zero in every record: give everyState a state that sets it", typ.Name(), name)
			}
		}
	}
}

// A self-upgrade in the fake env: the new binary's check passes, the
// supervisor execs with its record (the fake exec hands it over and
// fails, so the old image carries on), and a supervisor resumed from that
// record upgrades the workers, as the new image does without SelfOnly.
func TestSelfUpgradeInFakeEnv(t *testing.T) {
	env := newFakeEnv()
	env.checkOut = SelfCheckLine("v2", true) + "\n"
	cfg := testConfig(t, Config{Executable: "/bin/upgrader", Version: "v1", Signals: true})
	h := start(t, cfg, env, nil)
	old := h.started()
	h.ready(old)
	h.sync()
	progress, err := h.s.SelfUpgrade(context.Background(), SelfRequest{ClientFD: -1})
	if err != nil {
		t.Fatal(err)
	}
	check := <-env.checks
	h.exit(check, 0)
	var events []Event
	for p := range progress {
		events = append(events, p.Event)
		if p.Ack != nil {
			close(p.Ack)
		}
	}
	if want := []Event{EventChecking, EventChecked, EventExec}; !reflect.DeepEqual(events, want) {
		t.Fatalf("progress %v, want %v", events, want)
	}
	var record []byte
	select {
	case record = <-env.execs:
	case <-time.After(5 * time.Second):
		t.Fatal("no exec")
	}
	var st State
	if err := json.Unmarshal(record, &st); err != nil {
		t.Fatal(err)
	}
	if st.Version != StateVersion || st.Execs != 1 || !st.UpgradeWorkers || st.Current != 1 || len(st.Gens) != 1 {
		t.Fatalf("record: %+v", st)
	}
	// The fake exec failed: the old image says so and serves on.
	if s := h.status(); s.SelfUpgrade == nil || s.SelfUpgrade.OK || s.Current != 1 {
		t.Fatalf("after a failed exec: %+v", s.SelfUpgrade)
	}

	env2 := newFakeEnv()
	env2.nextPid = 1000
	h2 := start(t, cfg, env2, &st)
	nw := h2.started()
	h2.ready(nw)
	h2.killed(old, unix.SIGTERM) // the workers were upgraded after the exec
	if s := h2.status(); s.Current != 2 || s.Execs != 1 || !s.SelfUpgrade.OK {
		t.Fatalf("resumed: current %d, execs %d, self-upgrade %+v", s.Current, s.Execs, s.SelfUpgrade)
	}
}
