package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The manifests shipped in packaging/kubernetes pass both checks.
func TestShippedManifestsPass(t *testing.T) {
	files, err := filepath.Glob("../../packaging/kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifest in packaging/kubernetes: %v", err)
	}
	for _, f := range files {
		problems, err := CheckFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if len(problems) > 0 {
			t.Errorf("%s:\n  %s", f, strings.Join(problems, "\n  "))
		}
	}
}

// Each kind of mistake in the shipped Deployment is found, and named.
func TestMistakesAreFound(t *testing.T) {
	b, err := os.ReadFile("../../packaging/kubernetes/deployment.yaml")
	if err != nil {
		t.Fatal(err)
	}
	shipped := string(b)
	for _, tc := range []struct {
		name, old, new, want string
	}{
		{"misspelt field", "terminationGracePeriodSeconds: 45", "terminationGracePeriod: 45", "terminationGracePeriod: field not declared in schema"},
		{"wrong type", "periodSeconds: 2", "periodSeconds: two", "periodSeconds"},
		{"unknown kind", "kind: PodDisruptionBudget", "kind: PodDisruptionBudgett", "not a built-in kind"},
		{"readiness on the wrong path", "path: /readyz", "path: /livez", `readinessProbe.httpGet.path "/livez": want /readyz`},
		{"readiness on the wrong port", "httpGet: {path: /readyz, port: health}", "httpGet: {path: /readyz, port: http}", `readinessProbe.httpGet.port "http" is port "8080", but --health is "0.0.0.0:9090"`},
		{"no preStop", "command: [/usr/local/bin/upgrader, prestop, --control=/tmp/upgrader.sock]", "command: [sleep, '5']", "want exec of `upgrader prestop`"},
		{"preStop on another socket", "prestop, --control=/tmp/upgrader.sock]", "prestop, --control=/run/other.sock]", `lifecycle.preStop --control "/run/other.sock"`},
		{"grace too short", "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds 30s: want more than --shutdown-delay 5s + --drain-timeout 30s"},
		{"no shutdown delay", "--shutdown-delay=5s", "--shutdown-delay=0s", "--shutdown-delay is 0"},
		{"bad duration", "--drain-timeout=30s", "--drain-timeout=30", `--drain-timeout "30": not a duration`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(shipped, tc.old) {
				t.Fatalf("the shipped deployment.yaml has no %q to change", tc.old)
			}
			problems, err := Check("deployment.yaml", []byte(strings.Replace(shipped, tc.old, tc.new, 1)))
			if err != nil {
				t.Fatal(err)
			}
			all := strings.Join(problems, "\n")
			if !strings.Contains(all, tc.want) {
				t.Fatalf("problems:\n%s\nwant one containing %q", all, tc.want)
			}
		})
	}
}
