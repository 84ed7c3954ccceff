package supervise

import (
	"encoding/json"
	"fmt"
	"time"
)

// The state record of format 1, written by the releases before worker
// records, read so that `upgrader upgrade --self` from one of them to this
// one carries everything over. Fields the two formats share have the same
// JSON names; stateV1 holds those that differ.
type stateV1 struct {
	Gens     []genV1      `json:"generations"`
	Counts   [3]int       `json:"counts"` // restarts, upgrades ok, upgrades failed
	Handoffs HandoffStats `json:"handoffs"`
}

type genV1 struct {
	N          int             `json:"n"`
	State      GenerationState `json:"state"`
	Started    time.Time       `json:"started"`
	ReadyAt    time.Time       `json:"ready_at"`
	Slots      []int           `json:"slots"`
	Failures   []int           `json:"failures"`
	Restarts   int             `json:"restarts"`
	Reason     string          `json:"reason,omitempty"`
	ReplacedBy int             `json:"replaced_by,omitempty"`
	Workers    []workerV1      `json:"workers"`
}

type workerV1 struct {
	Pid             int             `json:"pid"`
	Slot            int             `json:"slot"`
	State           WorkerState     `json:"state"`
	Started         time.Time       `json:"started"`
	ReadyAt         time.Time       `json:"ready_at"`
	Status          string          `json:"status,omitempty"`
	ReadyTimeout    time.Duration   `json:"ready_timeout"`
	Asked           bool            `json:"asked,omitempty"`
	Cause           string          `json:"cause,omitempty"`
	Killed          bool            `json:"killed,omitempty"`
	KilledAt        time.Time       `json:"killed_at"`
	Exited          bool            `json:"exited,omitempty"`
	Lingering       []int           `json:"lingering,omitempty"`
	LingerSignalled bool            `json:"linger_signalled,omitempty"`
	Hurried         bool            `json:"hurried,omitempty"`
	LastPing        time.Time       `json:"last_ping"`
	Accepts         map[string]bool `json:"accepts,omitempty"`
	Deadline        time.Duration   `json:"deadline"` // left on its timer at SavedAt (-1: disarmed)
	HandoffFD       int             `json:"handoff_fd"`
}

// decodeV1 reads a format 1 record b into st, whose shared fields b has
// already filled.
func decodeV1(b []byte, st *State) error {
	var old stateV1
	if err := json.Unmarshal(b, &old); err != nil {
		return fmt.Errorf("state record of format 1: %w", err)
	}
	st.Version = StateVersion
	st.Counts = Counters{Restarts: old.Counts[0], UpgradesOK: old.Counts[1], UpgradesFailed: old.Counts[2], Handoffs: old.Handoffs}
	st.Gens = nil
	for _, og := range old.Gens {
		g := savedGen{GenerationRecord: GenerationRecord{N: og.N, State: og.State, Started: og.Started, ReadyAt: og.ReadyAt,
			Restarts: og.Restarts, Failures: og.Failures, Reason: og.Reason, ReplacedBy: og.ReplacedBy}, Slots: og.Slots}
		for _, ow := range og.Workers {
			g.Workers = append(g.Workers, ow.record(st.SavedAt))
		}
		st.Gens = append(st.Gens, g)
	}
	return nil
}

// record is w in format 2: its flags become its state, its deadline a
// time.
func (w workerV1) record(savedAt time.Time) savedWorker {
	r := WorkerRecord{Slot: w.Slot, Pid: w.Pid, State: w.State, Started: w.Started, ReadyAt: w.ReadyAt, Status: w.Status,
		ReadyTimeout: w.ReadyTimeout, Cause: w.Cause, Lingering: w.Lingering, LingerSignalled: w.LingerSignalled,
		Hurried: w.Hurried, LastPing: w.LastPing, Accepts: w.Accepts}
	switch {
	case w.Exited:
		r.State = WorkerLingering // format 1 kept no gone worker
	case w.Asked:
		r.State = WorkerDraining
	}
	if w.Asked && r.Cause == "" {
		r.Cause = "drain"
	}
	if w.Killed {
		r.KilledAt = w.KilledAt
		if r.KilledAt.IsZero() {
			r.KilledAt = savedAt
		}
	}
	if w.Deadline >= 0 {
		r.Deadline = savedAt.Add(w.Deadline)
	}
	return savedWorker{WorkerRecord: r, HandoffFD: w.HandoffFD}
}

// stripV1 removes from a format 1 record the fields whose shape changed,
// so that the rest decodes into State.
func stripV1(b []byte) []byte {
	var m map[string]json.RawMessage
	if json.Unmarshal(b, &m) != nil {
		return b
	}
	delete(m, "generations")
	delete(m, "counts")
	delete(m, "handoffs")
	out, err := json.Marshal(m)
	if err != nil {
		return b
	}
	return out
}

// encodeState writes st in format (StateVersion, or 2 or 1 for an earlier
// release that a self-upgrade rolls back to).
func encodeState(st *State, format int) ([]byte, error) {
	if format == 2 {
		// Format 2's fields are format 3's but for the groups, which its
		// readers ignore (and only a supervisor with none writes it).
		v2 := *st
		v2.Version = 2
		return json.Marshal(&v2)
	}
	b, err := json.Marshal(st)
	if err != nil || format == StateVersion {
		return b, err
	}
	if format != 1 {
		return nil, fmt.Errorf("state record format %d: this upgrader writes %d, 2 or 1", format, StateVersion)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	var gens []genV1
	for _, g := range st.Gens {
		og := genV1{N: g.N, State: g.State, Started: g.Started, ReadyAt: g.ReadyAt, Slots: g.Slots, Failures: g.Failures,
			Restarts: g.Restarts, Reason: g.Reason, ReplacedBy: g.ReplacedBy}
		for _, w := range g.Workers {
			og.Workers = append(og.Workers, workerOfV1(w, st.SavedAt))
		}
		gens = append(gens, og)
	}
	m["state_version"] = 1
	m["generations"] = gens
	m["counts"] = [3]int{st.Counts.Restarts, st.Counts.UpgradesOK, st.Counts.UpgradesFailed}
	m["handoffs"] = st.Counts.Handoffs
	return json.Marshal(m)
}

// workerOfV1 is w in format 1: its state becomes flags again, its
// deadline the time left at savedAt.
func workerOfV1(w savedWorker, savedAt time.Time) workerV1 {
	o := workerV1{Pid: w.Pid, Slot: w.Slot, State: w.State, Started: w.Started, ReadyAt: w.ReadyAt, Status: w.Status,
		ReadyTimeout: w.ReadyTimeout, Asked: w.Cause != "", Cause: w.Cause, Killed: !w.KilledAt.IsZero(), KilledAt: w.KilledAt,
		Lingering: w.Lingering, LingerSignalled: w.LingerSignalled, Hurried: w.Hurried, LastPing: w.LastPing,
		Accepts: w.Accepts, Deadline: -1, HandoffFD: w.HandoffFD}
	if w.State == WorkerLingering {
		o.State, o.Exited = WorkerDraining, true // format 1 named no lingering state
	}
	if !w.Deadline.IsZero() {
		o.Deadline = max(0, w.Deadline.Sub(savedAt))
	}
	return o
}
