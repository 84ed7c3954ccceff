package supervise

import (
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// A record of format 1, as the releases before worker records wrote it
// (their stGen and stWorker): generation 1 draining, its worker's main
// process exited with an orphan left and 8 s on its deadline; generation
// 2 serving, its worker ready and taking handoffs.
const recordV1 = `{"state_version":1,"saved_at":"2026-12-01T10:00:00Z","executable":"/usr/bin/upgrader",
"args":["upgrader","-l","127.0.0.1:0","--","server"],"execs":2,"listeners":[],"notify":{"fd":-1,"path":"","dir":""},
"carried":null,"fd_store":[],"next_generation":2,"current_generation":2,
"generations":[
 {"n":1,"state":"draining","started":"2026-12-01T09:00:00Z","ready_at":"2026-12-01T09:00:01Z","slots":[0],"failures":[0],
  "restarts":0,"replaced_by":2,"workers":[
  {"pid":4001,"slot":0,"state":"draining","started":"2026-12-01T09:00:00Z","ready_at":"2026-12-01T09:00:01Z",
   "ready_timeout":60000000000,"asked":true,"cause":"drain","killed_at":"0001-01-01T00:00:00Z","exited":true,
   "lingering":[4100],"linger_signalled":true,"last_ping":"0001-01-01T00:00:00Z","deadline":8000000000,"handoff_fd":-1}]},
 {"n":2,"state":"active","started":"2026-12-01T09:59:00Z","ready_at":"2026-12-01T09:59:01Z","slots":[4002],"failures":[1],
  "restarts":1,"workers":[
  {"pid":4002,"slot":0,"state":"ready","started":"2026-12-01T09:59:00Z","ready_at":"2026-12-01T09:59:01Z","status":"serving",
   "ready_timeout":60000000000,"killed_at":"0001-01-01T00:00:00Z","last_ping":"0001-01-01T00:00:00Z",
   "accepts":{"http":true},"deadline":-1,"handoff_fd":-1}]}],
"queued_upgrade":false,"upgrade_workers":false,"restarts":["2026-12-01T09:58:00Z"],"counts":[1,3,1],
"last_upgrade":{"generation":2,"ok":true,"started":"2026-12-01T09:59:00Z","ready_after_ns":1000000000},
"handoffs":{"handed_off":7,"refused":2,"malformed_messages":0},"next_handoff_id":9}`

// An upgrader of this release resumes from the record an earlier release
// wrote, so that upgrade --self from it loses nothing: the flags became
// states, the deadline a time, the counts counters.
func TestResumeFromFormat1Record(t *testing.T) {
	st, err := decodeState([]byte(recordV1))
	if err != nil {
		t.Fatal(err)
	}
	saved := st.SavedAt
	env := newFakeEnv()
	env.frozen = saved // the deadline is due 8 s after the save
	// The orphan its worker left lingers on.
	env.setTable(proctree.Table{4100: {Pid: 4100, PPid: os.Getpid(), Pgid: 4001}})
	cfg := testConfig(t, Config{Executable: "/usr/bin/upgrader"})
	h := start(t, cfg, env, st)
	s := h.status()
	if s.Execs != 2 || s.Current != 2 || s.Restarts != 1 || s.Upgrades[UpgradeOK] != 3 || s.Upgrades[UpgradeFailed] != 1 ||
		s.Handoffs.HandedOff != 7 || s.Handoffs.Refused != 2 {
		t.Fatalf("counts: %+v", s)
	}
	if len(s.Generations) != 2 {
		t.Fatalf("generations: %+v", s.Generations)
	}
	old, cur := s.Generations[0], s.Generations[1]
	if old.N != 1 || old.State != GenDraining || old.ReplacedBy != 2 || len(old.Workers) != 1 {
		t.Fatalf("generation 1: %+v", old)
	}
	if w := old.Workers[0]; w.State != WorkerLingering || w.Cause != "drain" || !w.LingerSignalled ||
		!w.Deadline.Equal(saved.Add(8*time.Second)) {
		t.Fatalf("generation 1's worker: %+v", w)
	}
	if cur.N != 2 || cur.State != GenActive || cur.Failures[0] != 1 || len(cur.Workers) != 1 {
		t.Fatalf("generation 2: %+v", cur)
	}
	if w := cur.Workers[0]; w.Pid != 4002 || w.State != WorkerReady || w.Status != "serving" || !w.Accepts["http"] || !w.Deadline.IsZero() {
		t.Fatalf("generation 2's worker: %+v", w)
	}
	if !s.Ready {
		t.Fatalf("not ready after resume: %s", s.NotReady)
	}
}

func TestParseSelfCheck(t *testing.T) {
	for _, tc := range []struct {
		out     string
		reads   []int
		version string
	}{
		{SelfCheckLine("v9", true) + "\n", []int{1, 2, StateVersion}, "v9"},
		{"upgrader-self-check state-version 1 version v0.4\n", []int{1}, "v0.4"}, // an earlier release
		{"noise\nupgrader-self-check state-version 3\n", []int{3}, ""},
	} {
		reads, version, err := ParseSelfCheck(tc.out)
		if err != nil || version != tc.version || len(reads) != len(tc.reads) {
			t.Fatalf("%q: %v %q %v", tc.out, reads, version, err)
		}
		for i := range reads {
			if reads[i] != tc.reads[i] {
				t.Fatalf("%q: reads %v, want %v", tc.out, reads, tc.reads)
			}
		}
	}
	for _, bad := range []string{"", "upgrader-self-check state-version x", "upgrader-self-check state-version 1 version v reads 1,y"} {
		if _, _, err := ParseSelfCheck(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// A record written in format 1, for a rollback to an earlier release,
// reads back as the same record: nothing is lost either way.
func TestFormat1RoundTrip(t *testing.T) {
	st, err := decodeState([]byte(recordV1))
	if err != nil {
		t.Fatal(err)
	}
	b, err := encodeState(st, 1)
	if err != nil {
		t.Fatal(err)
	}
	back, err := decodeState(b)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := json.Marshal(st)
	got, _ := json.Marshal(back)
	if string(want) != string(got) {
		t.Fatalf("format 1 round trip:\nwant %s\ngot  %s", want, got)
	}
	var v struct {
		Version int `json:"state_version"`
	}
	json.Unmarshal(b, &v)
	if v.Version != 1 {
		t.Fatalf("written as format %d", v.Version)
	}
}
