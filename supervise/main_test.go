package supervise_test

import (
	"os"
	"testing"

	"github.com/seed6cb0314a/upgrader/supervise"
)

// TestMain makes the test binary a program that embeds a supervisor: the
// examples' workers are re-execs of it, which Init turns into the worker.
func TestMain(m *testing.M) {
	supervise.Init()
	os.Exit(m.Run())
}
