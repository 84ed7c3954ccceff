// Package health serves the supervisor's status to load balancers,
// operators and Prometheus.
package health
