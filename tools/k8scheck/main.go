// Command k8scheck checks Kubernetes manifests offline, as scripts/test does
// for packaging/kubernetes:
//
//	go run ./tools/k8scheck ../../packaging/kubernetes/*.yaml   (from tools/k8scheck)
//
// Two checks, per object of every file (multi-document YAML):
//
//  1. The schema: the object is converted to Kubernetes' structured schema
//     of its kind (client-go's applyconfigurations.NewTypeConverter, the
//     schema server-side apply uses, generated from the API's OpenAPI), which
//     refuses undeclared fields and values of the wrong type, then decoded
//     strictly into its k8s.io/api Go type. Nothing is fetched: no cluster,
//     no network. (kubectl --dry-run=client needs a cluster to validate.)
//  2. For a container whose command runs upgrader, the rules that make a
//     pod leave without failing a request: the readiness probe is /readyz on
//     the --health port; preStop runs `upgrader prestop` on the same
//     --control socket, with --shutdown-delay above 0; and
//     terminationGracePeriodSeconds exceeds --shutdown-delay +
//     --drain-timeout.
//
// It prints one line per problem, naming the file, the object and the field,
// and exits 1 if there is any.
package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/applyconfigurations"
	"k8s.io/client-go/kubernetes/scheme"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: k8scheck FILE.yaml...")
		os.Exit(2)
	}
	bad := 0
	for _, path := range os.Args[1:] {
		problems, err := CheckFile(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, "k8scheck:", err)
			os.Exit(1)
		}
		for _, p := range problems {
			fmt.Println(p)
		}
		bad += len(problems)
		if len(problems) == 0 {
			fmt.Printf("%s: ok\n", path)
		}
	}
	if bad > 0 {
		os.Exit(1)
	}
}

// CheckFile checks every object in the YAML file at path. The error is for
// a file that cannot be read or parsed as YAML; problems name what is wrong
// with the objects in it.
func CheckFile(path string) (problems []string, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Check(filepath.Base(path), b)
}

// Check checks every object in the YAML documents data; name is what
// problems and errors call it.
func Check(name string, data []byte) (problems []string, err error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	tc := applyconfigurations.NewTypeConverter(scheme.Scheme)
	for i := 0; ; i++ {
		var obj map[string]any
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", name, i+1, err)
		}
		if len(obj) == 0 {
			continue // an empty document between two ---
		}
		u := &unstructured.Unstructured{Object: obj}
		where := fmt.Sprintf("%s: %s %q", name, u.GetKind(), u.GetName())
		typed, err := scheme.Scheme.New(u.GroupVersionKind())
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: apiVersion %q kind %q: not a built-in kind: %v", where, u.GetAPIVersion(), u.GetKind(), err))
			continue
		}
		if _, err := tc.ObjectToTyped(u); err != nil {
			problems = append(problems, fmt.Sprintf("%s: schema: %v", where, err))
			continue
		}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(obj, typed, true); err != nil {
			problems = append(problems, fmt.Sprintf("%s: strict decoding: %v", where, err))
			continue
		}
		if spec := podSpec(typed); spec != nil {
			for _, p := range checkPod(spec) {
				problems = append(problems, where+": "+p)
			}
		}
	}
	return problems, nil
}

// podSpec is the pod spec of a pod or of a workload's pod template (nil
// for other objects).
func podSpec(obj runtime.Object) *corev1.PodSpec {
	switch o := obj.(type) {
	case *corev1.Pod:
		return &o.Spec
	case *appsv1.Deployment:
		return &o.Spec.Template.Spec
	case *appsv1.StatefulSet:
		return &o.Spec.Template.Spec
	case *appsv1.DaemonSet:
		return &o.Spec.Template.Spec
	case *appsv1.ReplicaSet:
		return &o.Spec.Template.Spec
	case *batchv1.Job:
		return &o.Spec.Template.Spec
	case *batchv1.CronJob:
		return &o.Spec.JobTemplate.Spec.Template.Spec
	}
	return nil
}

// checkPod applies the upgrader rules to every container that runs upgrader.
func checkPod(spec *corev1.PodSpec) []string {
	var out []string
	for _, c := range spec.Containers {
		if len(c.Command) == 0 || filepath.Base(c.Command[0]) != "upgrader" {
			continue
		}
		for _, p := range checkUpgraderContainer(spec, c) {
			out = append(out, fmt.Sprintf("container %q: %s", c.Name, p))
		}
	}
	return out
}

func checkUpgraderContainer(spec *corev1.PodSpec, c corev1.Container) []string {
	var out []string
	flags := upgraderFlags(c.Command[1:])
	shutdownDelay, err := flagDuration(flags, "shutdown-delay", 0)
	if err != nil {
		out = append(out, err.Error())
	}
	drainTimeout, err := flagDuration(flags, "drain-timeout", 30*time.Second) // upgrader's default
	if err != nil {
		out = append(out, err.Error())
	}
	if shutdownDelay <= 0 {
		out = append(out, "--shutdown-delay is 0: the pod would drain before the endpoints controller and balancers stop sending to it")
	}

	health, ok := flags["health"]
	switch {
	case !ok:
		out = append(out, "no --health: there is no /readyz for the readiness probe")
	case c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil:
		out = append(out, "readinessProbe: want httpGet of /readyz on the --health port")
	default:
		g := c.ReadinessProbe.HTTPGet
		if g.Path != "/readyz" {
			out = append(out, fmt.Sprintf("readinessProbe.httpGet.path %q: want /readyz", g.Path))
		}
		if port := probePort(c, g.Port.String()); port != hostPort(health) {
			out = append(out, fmt.Sprintf("readinessProbe.httpGet.port %q is port %q, but --health is %q", g.Port.String(), port, health))
		}
	}

	var hook []string
	if c.Lifecycle != nil && c.Lifecycle.PreStop != nil && c.Lifecycle.PreStop.Exec != nil {
		hook = c.Lifecycle.PreStop.Exec.Command
	}
	switch {
	case len(hook) < 2 || filepath.Base(hook[0]) != "upgrader" || hook[1] != "prestop":
		out = append(out, fmt.Sprintf("lifecycle.preStop %q: want exec of `upgrader prestop`, which lasts exactly --shutdown-delay", hook))
	case upgraderFlags(hook[2:])["control"] != flags["control"]:
		out = append(out, fmt.Sprintf("lifecycle.preStop --control %q, but the container's is %q", upgraderFlags(hook[2:])["control"], flags["control"]))
	}

	grace := 30 * time.Second // Kubernetes' default
	if spec.TerminationGracePeriodSeconds != nil {
		grace = time.Duration(*spec.TerminationGracePeriodSeconds) * time.Second
	}
	if grace <= shutdownDelay+drainTimeout {
		out = append(out, fmt.Sprintf("terminationGracePeriodSeconds %s: want more than --shutdown-delay %s + --drain-timeout %s, or the kubelet kills requests still draining",
			grace, shutdownDelay, drainTimeout))
	}
	return out
}

// upgraderFlags reads upgrader's long flags (--name=value or --name value)
// up to "--", the start of the worker's command.
func upgraderFlags(args []string) map[string]string {
	flags := map[string]string{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			break
		}
		name, ok := strings.CutPrefix(a, "--")
		if !ok {
			continue
		}
		if n, v, ok := strings.Cut(name, "="); ok {
			flags[n] = v
		} else if i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			flags[name] = args[i+1]
			i++
		} else {
			flags[name] = "true"
		}
	}
	return flags
}

func flagDuration(flags map[string]string, name string, def time.Duration) (time.Duration, error) {
	v, ok := flags[name]
	if !ok {
		return def, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("--%s %q: not a duration: %v", name, v, err)
	}
	return d, nil
}

// probePort resolves a probe's port (a number or a container port's name)
// to a number, as a string ("" if the name is unknown).
func probePort(c corev1.Container, port string) string {
	if _, err := strconv.Atoi(port); err == nil {
		return port
	}
	i := slices.IndexFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == port })
	if i < 0 {
		return ""
	}
	return strconv.Itoa(int(c.Ports[i].ContainerPort))
}

// hostPort is the port of a HOST:PORT address ("" if it has none).
func hostPort(addr string) string {
	i := strings.LastIndexByte(addr, ':')
	if i < 0 {
		return ""
	}
	return addr[i+1:]
}
