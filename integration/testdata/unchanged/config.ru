# A Rack app for puma under upgrader (docs/unchanged-servers.md).
run lambda { |env|
  env['rack.input'].read
  [200, { 'Content-Type' => 'text/plain', 'Content-Length' => '6' }, ["hello\n"]]
}
